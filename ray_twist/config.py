"""Pydantic models for every YAML config: the one place where defaults live.

Every model forbids unknown keys, so a typo in a YAML file fails loudly instead of being
silently ignored. `load_yaml` turns validation errors into one message per problem that
names the file and the dotted key path (``build.yaml: training.lr: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

__all__ = [
    "ConfigError",
    "DeepSpeedSettings",
    "FaultSettings",
    "LoraSettings",
    "MergeTargetsConfig",
    "ResourceSettings",
    "RetrievalSettings",
    "Settings",
    "TrainingSettings",
    "format_validation_error",
    "load_yaml",
]


class Settings(BaseModel):
    """Base of all config models: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


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

    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)


class FaultSettings(Settings):
    """Failure handling; `fail_at_step` injects one worker crash (chaos tests, drills)."""

    max_failures: int = Field(default=1, ge=-1, description="worker-group restarts; -1 = unlimited")
    fail_at_step: int | None = Field(
        default=None, ge=1, description="raise once in rank 0 when this step starts (testing only)"
    )


class ConfigError(ValueError):
    """A config file does not validate; the message names the file and each bad key."""


M = TypeVar("M", bound=BaseModel)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: dotted.key.path: message``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"{source}: {key}: {err['msg']}")
    return "\n".join(lines)


def load_yaml(path: str | Path, model_cls: type[M]) -> M:
    """Parse and validate a YAML file; errors name the file and the key, not a traceback."""
    path = Path(path)
    try:
        data: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc


class RetrievalSettings(Settings):
    """R_s = softmax((λ·cos(q_t, k_c) + (1−λ)·cos(q_x, k_s)) / τ) over the top-k sources."""

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)

    lam: float = Field(default=0.5, ge=0.0, le=1.0, alias="lambda",
                       description="1 = task level (cluster keys) only, 0 = instance level only")  # fmt: skip
    tau: float = Field(default=0.1, gt=0.0, description="softmax temperature")
    top_k: int | None = Field(default=None, ge=1, description="keep the k best sources")


class MergeTargetsConfig(Settings):
    """jobs/merge_targets.py: TWIST initialisations for many targets in one batched job."""

    pool: str = Field(description="pool URI")
    targets: str = Field(description="targets table: name + weights, or name + data URI")
    out: str = Field(description="output URI; one PEFT adapter per target at <out>/<name>/")
    rank: int = Field(default=16, ge=1, description="rank q kept from each merged SVD")
    method: Literal["svd", "linear", "dense-svd"] = "svd"
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    chunk_size: int = Field(default=128, ge=1, description="targets per batched core SVD")
    dtype: Literal["fp32", "bf16"] = Field(default="fp32", description="stored adapter precision")
    num_gpus: float = Field(default=0, ge=0, description="GPUs for the merge task (CUDA merge)")
