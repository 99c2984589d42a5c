"""`twist adapt`: initialise a target style's LoRA from the pool, then fine-tune it.

The initialisation (`AdaptConfig.init`) is where TWIST differs from its baselines:

    twist          R_s by retrieval (λ, τ, top-k), ΔW_t = Σ_s R_s ΔW_s, top-q SVD
    uniform        R_s = 1/N for every source, top-q SVD
    dense-svd-avg  the uniform average through the dense SVD reference merge — numerically
                   `uniform` up to SVD precision; a check on the factored merge, not a method
    scratch        PEFT's default LoRA init (A random, B = 0) at rank q; the pool is unused

`retrieval.merge_order` applies to every merged init: `sum_then_truncate` (above, the default)
or `truncate_then_sum`, Σ_s R_s trunc_q(ΔW_s) kept exactly, so that the init adapter (and the
LoRA fine-tuned from it) has rank Σ_s min(q, r_s) over the sources with R_s ≠ 0, not q.

Fine-tuning is the sources' own loop (`train.train_lora`: Ray Train + DeepSpeed, validation
split and early stopping from `training`), started from that adapter. The output directory
is a PEFT adapter dir plus `twist_adapt.json` (settings, metrics, learning curve) and
`twist_retrieval.json` (the source weights the init used; none for scratch).

Runs are named after everything that changes the result (data, init, rank, retrieval,
training, pool generation), so re-running after a crash resumes from the last checkpoint
and a changed setting never resumes a stale one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from ray_twist import storage
from ray_twist.backbone import (
    AllowUntrainedBase,
    absolute_model_path,
    check_trained_base,
    config_hash,
)
from ray_twist.data.task import Task
from ray_twist.features import Featurizer
from ray_twist.initialise import RETRIEVAL_FILE, init_target, merge_weighted
from ray_twist.merge import MergeMethod
from ray_twist.pool import Pool, pool_merge_sources, validate_name
from ray_twist.retrieval import RetrievalSettings
from ray_twist.settings import Settings, json_digest
from ray_twist.train import TrainResult, train_lora
from ray_twist.train.config import (
    DeepSpeedSettings,
    LoraSettings,
    ResourceSettings,
    TrainingSettings,
)

ADAPT_FILE = "twist_adapt.json"
TRAIN_DIR = "_train"

__all__ = ["ADAPT_FILE", "AdaptResult", "adapt", "init_adapter", "run_name"]


@dataclass
class AdaptResult:
    """A fine-tuned target adapter and how it came about."""

    adapter_dir: str
    init: str
    weights: dict[str, float] | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def run_name(task: Task, config: AdaptConfig, pool: Pool | None, base_model: str) -> str:
    """`<task>-<init>-<12 hex>`: the hash covers everything that changes the trained adapter."""
    digest = json_digest(
        {
            "data": task.content_hash(),
            "config": config.model_dump(
                mode="json", exclude={"storage_path", "resources", "allow_untrained_base"}
            ),
            "pool": [pool.uri, pool.generation] if pool is not None else None,
            "base": base_model,
        }
    )
    return f"{task.name}-{config.init}-{digest[:12]}"


def init_adapter(
    pool: Pool,
    task: Task,
    out_dir: str,
    config: AdaptConfig,
    featurizer: Featurizer | None = None,
) -> dict[str, float]:
    """Write the merged (non-scratch) initialisation at `out_dir`; return the weights used."""
    if config.init == "twist":
        return init_target(pool, task, out_dir, config.rank, config.retrieval, "svd", featurizer)
    weights = {name: 1.0 / len(pool.sources) for name in pool.sources}
    method: MergeMethod = "dense-svd" if config.init == "dense-svd-avg" else "svd"
    merge_weighted(
        pool_merge_sources(pool),
        [out_dir],
        [weights],
        config.rank,
        method,
        meta=[{"target": task.name, "init": config.init}],
        progress=False,
        merge_order=config.retrieval.merge_order,
    )
    return weights


def _base_model(config: AdaptConfig, pool: Pool | None) -> str:
    if pool is None:
        if config.base_model is None:
            raise ValueError("scratch adaptation without a pool needs base_model")
        return config.base_model
    if config.base_model is not None and config_hash(config.base_model) != pool.base_config_hash:
        raise ValueError(
            f"base_model {config.base_model!r} is not the base model of the pool at {pool.uri} "
            f"({pool.base_model!r}); its adapters cannot initialise a LoRA on it"
        )
    return config.base_model or pool.base_model


def _lora(config: AdaptConfig, pool: Pool | None) -> LoraSettings:
    """Scratch LoRA shape: rank q, α = q (scaling 1, like merged inits), the pool's modules."""
    targets = config.target_modules
    if targets is None and pool is not None:
        pool_targets = pool.lora_config.get("target_modules")
        targets = [pool_targets] if isinstance(pool_targets, str) else pool_targets
    return LoraSettings(r=config.rank, alpha=config.rank, target_modules=targets)


def _summary(result: TrainResult) -> dict[str, Any]:
    history = result.history
    out: dict[str, Any] = {
        "run": result.name,
        "stopped_early": bool(result.metrics.get("stopped_early")),
        "best_val_loss": result.metrics.get("best_val_loss"),
        "world_size": result.metrics.get("world_size"),  # DeepSpeed's process group
        "zero_stage": result.metrics.get("zero_stage"),
    }
    if history:
        val = [row["val_loss"] for row in history if "val_loss" in row]
        out |= {
            "steps": history[-1]["step"],
            "epochs": history[-1]["epoch"] + 1,
            "first_loss": history[0]["loss"],
            "loss": history[-1]["loss"],
            "first_val_loss": val[0] if val else None,
            "train_s": history[-1]["step_end"] - history[0]["step_start"],
        }
    return out


def adapt(
    task: Task,
    out_dir: str,
    config: AdaptConfig | None = None,
    pool: Pool | str | None = None,
    featurizer: Featurizer | None = None,
) -> AdaptResult:
    """Initialise (per `config.init`) and fine-tune a LoRA for `task`; write it to `out_dir`.

    `pool` (a Pool or its URI) is required for every init but scratch. Training runs live
    under `config.storage_path` (default `<out_dir>/_train`).
    """
    config = config or AdaptConfig()
    validate_name(task.name, "target task name")
    if len(task) == 0:
        raise ValueError(f"target task {task.name!r} has no examples")
    pool = Pool.open(pool) if isinstance(pool, str) else pool
    if pool is None and config.init != "scratch":
        raise ValueError(f"init {config.init!r} merges pool sources: pass a pool")
    # local paths leave the driver absolute: Ray Train workers run in other directories
    out_dir = storage.absolute(out_dir)
    base_model = absolute_model_path(_base_model(config, pool))
    if not config.allow_untrained_base:
        check_trained_base(base_model)  # a bare encoder fails here; other checkpoints in setup
    name = run_name(task, config, pool, base_model)
    storage_path = storage.absolute(config.storage_path or storage.join(out_dir, TRAIN_DIR))

    started = time.perf_counter()
    weights: dict[str, float] | None = None
    init_dir: str | None = None
    if pool is not None and config.init != "scratch":
        init_dir = storage.join(storage_path, f"{name}-init")  # where every worker can read it
        weights = init_adapter(pool, task, init_dir, config, featurizer)
    init_s = time.perf_counter() - started
    result = train_lora(
        task,
        base_model,
        _lora(config, pool),
        config.training,
        config.deepspeed,
        config.resources,
        storage_path,
        name,
        init_adapter=init_dir,
        allow_untrained_base=config.allow_untrained_base,
    )
    fs, path = storage.resolve(out_dir)
    fs.create_dir(path, recursive=True)
    with storage.local_dir(result.adapter_dir) as local:
        storage.upload_dir(local, out_dir)

    record: dict[str, Any] = {
        "target": task.name,
        "init": config.init,
        "rank": config.rank,
        "n_examples": len(task),
        "base_model": base_model,
        "pool": pool.uri if pool is not None else None,
        "pool_generation": pool.generation if pool is not None else None,
        "config": config.model_dump(mode="json", by_alias=True),
        "metrics": {
            **_summary(result),
            "init_s": init_s,
            "total_s": time.perf_counter() - started,
        },
        "history": result.history,
    }
    storage.write_bytes(storage.join(out_dir, ADAPT_FILE), json.dumps(record, indent=2).encode())
    if weights is not None:
        retrieval = {
            "target": task.name,
            "init": config.init,
            "rank": config.rank,
            "merge_order": config.retrieval.merge_order,
            "weights": weights,
        }
        if config.init == "twist":
            retrieval |= config.retrieval.model_dump(by_alias=True)
        storage.write_bytes(
            storage.join(out_dir, RETRIEVAL_FILE), json.dumps(retrieval, indent=2).encode()
        )
    return AdaptResult(out_dir, config.init, weights, record["metrics"], result.history)


# ---------------------------------------------------------------- settings

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
    allow_untrained_base: AllowUntrainedBase = False
