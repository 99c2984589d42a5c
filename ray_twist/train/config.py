"""Settings of a training run: the LoRA's shape, the loop, DeepSpeed, resources, failures."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ray_twist.settings import Settings

__all__ = [
    "DeepSpeedSettings",
    "FaultSettings",
    "LoraSettings",
    "ResourceSettings",
    "TrainingSettings",
]


class LoraSettings(Settings):
    """Shape of every LoRA the system trains (sources and targets alike)."""

    r: int = Field(default=8, ge=1, description="LoRA rank")
    alpha: int = Field(default=16, ge=1, description="LoRA scaling numerator: ΔW = (alpha/r)·B·A")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description="module names to adapt; None = the backbone's default",
    )


class TrainingSettings(Settings):
    """The optimisation loop; `batch_size` is per worker, so the global batch scales."""

    epochs: int = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps")
    lr: float = Field(default=1e-3, gt=0)
    lr_schedule: Literal["constant", "linear"] = Field(
        default="constant", description="linear: warm up, then decay to 0 at max_steps"
    )
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up from 0 to lr")
    batch_size: int = Field(default=8, ge=1, description="examples per worker per step")
    max_source_length: int = Field(default=128, ge=1)
    max_target_length: int = Field(default=128, ge=1)
    seed: int = 0
    checkpoint_every_steps: int | None = Field(
        default=100, ge=1, description="also checkpoint every N steps; None = only at the end"
    )
    val_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="held out for a validation loss after each epoch"
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="stop after this many epochs without validation improvement"
    )
    early_stopping_min_delta: float = Field(
        default=0.0, ge=0.0, description="a validation loss must drop by more than this to count"
    )

    @model_validator(mode="after")
    def _decay_needs_an_end(self) -> TrainingSettings:
        if self.lr_schedule == "linear" and self.max_steps is None:
            raise ValueError("lr_schedule: linear decays to 0 at max_steps: set max_steps")
        return self

    @field_validator("early_stopping_patience")
    @classmethod
    def _patience_needs_validation(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("val_fraction"):
            raise ValueError("early stopping needs a validation split: set val_fraction > 0")
        return value


class DeepSpeedSettings(Settings):
    """DeepSpeed engine options (ZeRO stage, mixed precision, optimizer offload)."""

    zero_stage: int = Field(default=2, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False


class ResourceSettings(Settings):
    """Ray resources per training run; fractional CPUs let small runs share a node."""

    num_workers: int = Field(
        default=1, ge=0, description="0 = Ray Train local mode: the loop runs in the caller"
    )
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)


class FaultSettings(Settings):
    """Failure handling: a failed worker group restarts from its latest checkpoint."""

    max_failures: int = Field(default=1, ge=-1, description="worker-group restarts; -1 = unlimited")
