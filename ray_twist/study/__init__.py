"""The low-resource study: how much does a TWIST initialisation help with little target data?

`run_study(config)` (jobs/low_resource.py) on the synthetic style world:

1. **base model** — a tiny T5 over the world's own vocabulary, pre-trained to copy neutral
   sentences, so that LoRAs learn *styles* (a stand-in for a pretrained LM; cached), or any
   model given as `base_model`;
2. **pool** — one LoRA per source style (every style but the held-out target, whose family
   sibling stays in), trained and keyed by `build.build_pool` (Ray Train + DeepSpeed);
3. **judge** — a `StyleClassifier` on the world's style-labelled texts (its held-out accuracy
   is reported), plus the world's exact rule checker;
4. **sweep** — data fractions × initialisations × seeds, and TWIST ablations (λ, q, top-k)
   at one fraction, each run = `adapt.adapt` (Ray Train local mode inside the task) +
   generation + scoring, fanned out as parallel Ray tasks. Every finished run writes
   `runs/<run>.json` (its row and per-example scores); a re-run skips finished runs;
5. **report** — `results.parquet` + `results.json` (one row per run), `summary.md` (means ±
   std over seeds), `fig2_g_vs_fraction.png`, `fig4_g_vs_rank.png`, `fig5_style_umap.png`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_twist import storage
from ray_twist.config import BuildPoolConfig, StudyConfig
from ray_twist.data.synthetic import STYLES, make_task, style_corpus
from ray_twist.evaluate.classifier import StyleClassifier
from ray_twist.evaluate.run import TestSet
from ray_twist.study.report import report, summarise
from ray_twist.study.runs import Context, RunSpec, execute, plan_runs
from ray_twist.study.world import build_world_backbone

__all__ = ["RunSpec", "StudyResult", "build_world_backbone", "plan_runs", "run_study", "summarise"]


@dataclass
class StudyResult:
    """Where the study wrote its outputs, and its rows."""

    out: str
    rows: list[dict[str, Any]]  # one per (sweep, run): a run shared by sweeps appears in each
    runs: int  # distinct adaptations
    summary: str
    figures: list[str]
    seconds: float


def _pool(config: StudyConfig, base_model: str, sources: list[str]) -> str:
    from ray_twist.build import build_pool

    uri = storage.join(config.out, "pool")
    build = BuildPoolConfig.model_validate(
        {
            "base_model": {"path": base_model},
            "lora": config.source_lora.model_dump(),
            "sources": [
                {
                    "synthetic": {
                        "styles": sources,
                        "n_per_style": config.world.n_source,
                        "seed": config.world.seed,
                    }
                }
            ],
            "training": config.source_training.model_dump(),
            "deepspeed": config.deepspeed.model_dump(),
            "resources": config.resources.model_dump(),
            "featurizer": {"model": config.featurizer},
            "pool": uri,
            "storage_path": storage.join(config.out, "sources"),
        }
    )
    build_pool(build, progress=False)
    return uri


def run_study(config: StudyConfig) -> StudyResult:
    """The whole study (see the module docstring); uses the running Ray or starts one.

    `config.out` must be a local or shared directory (the base model and figures go there).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    world = config.world
    sources = world.sources or [s for s in STYLES if s != world.target]
    base_model = config.base_model or ray.get(  # a Ray task: one CPU, one torch thread
        ray.remote(num_cpus=1)(build_world_backbone).remote(
            str(Path(config.out, "base_model").absolute()), config.world_backbone
        )
    )
    pool = _pool(config, base_model, sources)
    everything = make_task(world.target, world.n_target + world.n_test, seed=world.seed + 1)
    target = everything.take(list(range(world.n_target)))
    test = TestSet.from_task(everything.take(list(range(world.n_target, len(everything)))))
    corpus = style_corpus(config.evaluation.classifier_texts_per_style, seed=world.seed)
    classifier = StyleClassifier.fit(
        [t for t, _ in corpus], [label for _, label in corpus], config.featurizer, seed=world.seed
    )
    ctx = Context(config.out, pool, target, test, world.target, classifier, config)

    specs = plan_runs(config)
    rows = execute(specs, ctx)
    table = [{**rows[s.key], "sweep": s.sweep} for s in specs]  # a shared run: once per sweep
    pq.write_table(pa.Table.from_pylist(table), storage.join(config.out, "results.parquet"))
    text, figures, stats = report(ctx, sources, table)
    storage.write_bytes(storage.join(config.out, "summary.md"), text.encode())
    seconds = time.perf_counter() - started
    record = {
        "config": config.model_dump(mode="json", by_alias=True),
        "rows": table,
        "summary": stats,
        "seconds": seconds,
        "distinct_runs": len(rows),
        "classifier_heldout_acc": classifier.heldout_accuracy,
    }
    storage.write_bytes(storage.join(config.out, "results.json"), json.dumps(record).encode())
    return StudyResult(config.out, table, len(rows), text, figures, seconds)
