"""The study's plan and its unit of work: one adaptation + evaluation, run as a Ray task."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray_twist import storage
from ray_twist.adapt import AdaptConfig, InitMethod
from ray_twist.data.task import Task
from ray_twist.evaluate.classifier import StyleClassifier, shared_featurizer
from ray_twist.evaluate.run import TestSet, evaluate_adapter
from ray_twist.merge import DEFAULT_MERGE_ORDER, MergeOrder
from ray_twist.recipes.study.config import StudyConfig
from ray_twist.retrieval import RetrievalSettings
from ray_twist.settings import json_digest

__all__ = ["Context", "RunSpec", "execute", "finished_row", "fingerprints", "plan_runs", "run_one"]


@dataclass(frozen=True)
class RunSpec:
    """One adaptation of the study: which sweep it serves and its settings."""

    sweep: str  # "main", "lambda", "tau", "rank", "top_k" or "merge_order"
    init: InitMethod
    fraction: float
    seed: int
    rank: int
    lam: float
    tau: float
    top_k: int | None
    merge_order: MergeOrder = DEFAULT_MERGE_ORDER
    steps: int | None = None  # None: the study's step budget (the full-data baseline has its own)

    @property
    def key(self) -> tuple[Any, ...]:
        """What the run computes (a run shared by two sweeps is run once)."""
        return (self.init, self.fraction, self.seed, self.rank, self.lam, self.tau, self.top_k,
                self.merge_order, self.steps)  # fmt: skip

    @property
    def name(self) -> str:
        """Named by its settings; the merge order only when not the default, so the names
        (and finished runs) of studies from before the setting stay the same."""
        k = "all" if self.top_k is None else self.top_k
        name = (
            f"{self.init}-f{self.fraction:g}-s{self.seed}-q{self.rank}-l{self.lam:g}"
            f"-t{self.tau:g}-k{k}"
        )
        if self.merge_order != DEFAULT_MERGE_ORDER:
            name += f"-{self.merge_order}"
        if self.steps is not None:
            name += f"-n{self.steps}"
        return name.replace(".", "p")


def plan_runs(config: StudyConfig) -> list[RunSpec]:
    """Main grid (fractions × inits × seeds) then TWIST ablations, without duplicates."""
    base, order = config.retrieval, config.retrieval.merge_order
    specs = [
        RunSpec("main", init, fraction, seed, config.rank, base.lam, base.tau, base.top_k, order)
        for fraction in config.fractions
        for init in config.inits
        for seed in config.seeds
    ]
    full_data = config.baselines.full_data_steps
    if full_data is not None:
        specs += [
            RunSpec("full-data", "scratch", 1.0, seed, config.rank, base.lam, base.tau,
                    base.top_k, order, steps=full_data)
            for seed in config.seeds[:1]
        ]  # fmt: skip
    ab = config.ablations
    if ab is not None:
        for seed in ab.seeds or config.seeds:
            twist = RunSpec(
                "lambda", "twist", ab.fraction, seed, config.rank, base.lam, base.tau, base.top_k,
                order,
            )  # fmt: skip
            specs += [dataclasses.replace(twist, lam=lam) for lam in ab.lambdas]
            specs += [dataclasses.replace(twist, sweep="tau", tau=tau) for tau in ab.taus]
            specs += [dataclasses.replace(twist, sweep="rank", rank=q) for q in ab.ranks]
            specs += [dataclasses.replace(twist, sweep="top_k", top_k=k) for k in ab.top_ks]
            specs += [
                dataclasses.replace(twist, sweep="merge_order", merge_order=merge_order)
                for merge_order in ab.merge_orders
            ]
    return specs


# ---------------------------------------------------------------- one run (a Ray task)


@dataclass
class Context:
    """What every run shares (shipped once through the object store)."""

    out: str
    pool: str
    target: Task
    test: TestSet
    style: str
    classifier: StyleClassifier
    config: StudyConfig
    source_examples: dict[str, list[tuple[str, str]]]  # (input, output) pairs per source style
    fingerprints: dict[str, str]  # see `fingerprints`


def fingerprints(config: StudyConfig, pool: str, target: Task, test: TestSet) -> dict[str, str]:
    """What a finished run's row depends on beyond its `RunSpec`: `setup` (data, judge,
    training, evaluation and retrieval settings) and `pool` (the pool generation's manifest:
    sources, keys, clusters). A run is reused only while both still hold (`pool` only for
    inits that read the pool), so a re-clustered pool or a changed setting reruns it."""
    from ray_twist.pool import Pool

    sweep_only = {"out", "fractions", "inits", "seeds", "ablations", "cpus_per_run", "baselines"}
    setup = {
        "config": config.model_dump(mode="json", exclude=sweep_only),
        "target": target.content_hash(),
        "test": [test.sources, test.references],
    }
    return {"setup": json_digest(setup)[:16], "pool": json_digest(Pool.open(pool).manifest)[:16]}


def _depends_on(spec: RunSpec) -> list[str]:
    return ["setup"] if spec.init == "scratch" else ["setup", "pool"]


def _mean_loss(history: Sequence[dict[str, Any]]) -> float | None:
    """Mean training loss over a run's steps. Every init of one seed and fraction sees the
    same batches in the same order, so this compares inits pair by pair (the area under
    the learning curve): a finer read of the init than G on a small test set."""
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    return sum(losses) / len(losses) if losses else None


def run_one(spec: RunSpec, ctx: Context) -> dict[str, Any]:
    """Adapt, restyle the test set and score it; write and return the run's row."""
    from ray_twist.adapt import adapt
    from ray_twist.generation import GenerationSettings

    cfg = ctx.config
    started = time.perf_counter()
    task = ctx.target.sample(fraction=spec.fraction, seed=spec.seed)
    adapt_config = AdaptConfig(
        init=spec.init,
        rank=spec.rank,
        retrieval=RetrievalSettings.model_validate(
            {
                "lambda": spec.lam,
                "tau": spec.tau,
                "top_k": spec.top_k,
                "merge_order": spec.merge_order,
            }
        ),
        training=cfg.training.model_copy(
            update={"seed": spec.seed, "max_steps": spec.steps or cfg.training.max_steps}
        ),
        deepspeed=cfg.deepspeed,
        resources=cfg.resources,
        storage_path=storage.join(ctx.out, "train"),
        allow_untrained_base=cfg.allow_untrained_base,
    )
    result = adapt(
        task,
        storage.join(ctx.out, "adapters", spec.name),
        adapt_config,
        ctx.pool,
        featurizer=shared_featurizer(cfg.featurizer),
    )
    ev = cfg.evaluation
    settings = GenerationSettings(max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams)
    report = evaluate_adapter(
        result.adapter_dir,
        ctx.test,
        ctx.style,
        ctx.classifier,
        generation=settings,
        batch_size=ev.batch_size,
    )
    row = {
        **dataclasses.asdict(spec),
        "run": spec.name,
        "n_train": len(task),
        **{k: getattr(report, k) for k in ("acc", "acc_rule", "bleu", "g", "g_rule")},
        "classifier_heldout_acc": report.classifier_heldout_acc,
        **{k: result.metrics.get(k) for k in ("steps", "epochs", "best_val_loss", "train_s")},
        "train_loss": _mean_loss(result.history),
        "weights": json.dumps(result.weights) if result.weights is not None else None,
        "seconds": time.perf_counter() - started,
    }
    record = {
        "row": row,
        "fingerprints": {k: ctx.fingerprints[k] for k in _depends_on(spec)},
        "examples": [dataclasses.asdict(e) for e in report.examples],
    }
    storage.write_bytes(
        storage.join(ctx.out, "runs", f"{spec.name}.json"), json.dumps(record).encode()
    )
    return row


def finished_row(out: str, spec: RunSpec, current: dict[str, str]) -> dict[str, Any] | None:
    """The row of `spec`'s finished run under `out`, or None when there is none or it is
    stale (a fingerprint it depends on differs from `current`, or it has none)."""
    uri = storage.join(out, "runs", f"{spec.name}.json")
    if not storage.exists(uri):
        return None
    record = json.loads(storage.read_bytes(uri))
    recorded = record.get("fingerprints", {})
    if any(recorded.get(k) != current[k] for k in _depends_on(spec)):
        return None
    row: dict[str, Any] = record["row"]
    return row


def execute(specs: Sequence[RunSpec], ctx: Context) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Run every distinct spec not already done, as parallel Ray tasks."""
    import ray

    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    todo: dict[tuple[Any, ...], RunSpec] = {}
    for spec in specs:
        if spec.key in rows or spec.key in todo:
            continue
        done = finished_row(ctx.out, spec, ctx.fingerprints)
        if done is not None:
            rows[spec.key] = done
        else:
            todo[spec.key] = spec
    remote = ray.remote(num_cpus=ctx.config.cpus_per_run, max_retries=1)(run_one)
    shared = ray.put(ctx)
    # longest first (the full-data baseline trains for many more steps), so that it runs
    # beside the grid instead of after it
    budget = ctx.config.training.max_steps or 0
    order = sorted(todo.items(), key=lambda item: -(item[1].steps or budget))
    pending = {remote.options(name=f"study[{s.name}]").remote(s, shared): k for k, s in order}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        rows[pending.pop(ready[0])] = ray.get(ready[0])
    return rows
