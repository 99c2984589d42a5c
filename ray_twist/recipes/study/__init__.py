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

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_twist import storage
from ray_twist.build.config import BuildPoolConfig
from ray_twist.data.synthetic import STYLES, make_task, style_corpus
from ray_twist.data.task import Task
from ray_twist.evaluate.classifier import StyleClassifier
from ray_twist.evaluate.run import TestSet
from ray_twist.recipes.study.config import StudyConfig
from ray_twist.recipes.study.report import report, summarise
from ray_twist.recipes.study.runs import Context, RunSpec, execute, fingerprints, plan_runs
from ray_twist.recipes.study.world import build_world_backbone

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


@dataclass
class _Setup:
    """What a study needs before its runs: the base, pool, target data and judge."""

    base_model: str
    pool: str
    sources: list[str]
    source_examples: dict[str, list[tuple[str, str]]]
    target: Task
    test: TestSet
    style: str
    classifier: StyleClassifier


def _synthetic_setup(config: StudyConfig) -> _Setup:
    """The synthetic world: its copy-trained T5, a pool of its styles, its rule-made data."""
    import ray

    from ray_twist.build import build_pool

    world = config.world
    sources = world.sources or [s for s in STYLES if s != world.target]
    base_model = config.base_model or ray.get(  # a Ray task: one CPU, one torch thread
        ray.remote(num_cpus=1)(build_world_backbone).remote(
            str(Path(config.out, "base_model").absolute()), config.world_backbone
        )
    )
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
            "allow_untrained_base": config.allow_untrained_base,
        }
    )
    build_pool(build, progress=False)
    everything = make_task(world.target, world.n_target + world.n_test, seed=world.seed + 1)
    corpus = style_corpus(config.evaluation.classifier_texts_per_style, seed=world.seed)
    n_map = config.evaluation.umap_texts_per_group
    return _Setup(
        base_model=base_model,
        pool=uri,
        sources=sources,
        source_examples={s: make_task(s, n_map, seed=world.seed + 7).pairs for s in sources},
        target=everything.take(list(range(world.n_target))),
        test=TestSet.from_task(everything.take(list(range(world.n_target, len(everything))))),
        style=world.target,
        classifier=StyleClassifier.fit(
            [t for t, _ in corpus],
            [label for _, label in corpus],
            config.featurizer,
            seed=world.seed,
        ),  # fmt: skip
    )


def _real_setup(config: StudyConfig) -> _Setup:
    """Real text: the pool from its build config, target pairs and judge data from files."""
    from ray_twist.build import build_pool
    from ray_twist.data.readers import read_task
    from ray_twist.evaluate.run import read_style_data
    from ray_twist.settings import load_yaml

    real = config.real
    assert real is not None
    build = load_yaml(real.pool, BuildPoolConfig)
    base_model = build.base_model.path
    if base_model is None or (config.base_model and config.base_model != base_model):
        raise ValueError(
            f"real.pool: {real.pool} must name the study's base model as base_model.path "
            f"(got {base_model!r}, study base_model {config.base_model!r})"
        )
    build_pool(build, progress=False)
    sources = [name for spec in build.sources for name in spec.source_names()]
    n_map = config.evaluation.umap_texts_per_group
    examples = {
        spec.source_names()[0]: read_task(spec.data).pairs[:n_map]
        for spec in build.sources
        if spec.data is not None and spec.objective == "parallel"
    }
    test = read_task(real.test).sample(n=real.n_test, seed=real.seed)
    texts, labels = read_style_data(real.judge_data)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    rng = random.Random(real.seed)
    keep = sorted(
        i
        for rows in by_label.values()
        for i in rng.sample(rows, min(len(rows), real.judge_texts_per_style))
    )
    if real.style not in by_label:
        raise ValueError(f"real.style: {real.style!r} is not a label of {real.judge_data}")
    return _Setup(
        base_model=base_model,
        pool=build.pool,
        sources=sources,
        source_examples=examples,
        target=read_task(real.train),
        test=TestSet.from_task(test),
        style=real.style,
        classifier=StyleClassifier.fit(
            [texts[i] for i in keep], [labels[i] for i in keep], config.featurizer, seed=real.seed
        ),
    )


def _identity_row(setup: _Setup) -> dict[str, Any]:
    """The baseline that copies every input: what any adapter must beat."""
    from ray_twist.backbone import load_backbone
    from ray_twist.evaluate.run import evaluate_outputs, tokenizer_lowercases

    lowercase = tokenizer_lowercases(load_backbone(setup.base_model).tokenizer)
    report = evaluate_outputs(
        setup.test, setup.test.sources, setup.style, setup.classifier, lowercase=lowercase
    )
    return {
        "sweep": "baseline",
        "init": "identity",
        "run": "identity",
        "fraction": 0.0,
        "seed": 0,
        **{k: getattr(report, k) for k in ("acc", "acc_rule", "bleu", "g", "g_rule")},
        "examples": [dataclasses.asdict(e) for e in report.examples],
    }


def run_study(config: StudyConfig) -> StudyResult:
    """The whole study (see the module docstring); uses the running Ray or starts one.

    `config.out` must be a local or shared directory (the base model and figures go there).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    started = time.perf_counter()
    if "://" not in config.out:  # Ray tasks need paths that do not depend on their cwd
        config = config.model_copy(update={"out": str(Path(config.out).absolute())})
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    setup = _real_setup(config) if config.real is not None else _synthetic_setup(config)
    ctx = Context(
        config.out, setup.pool, setup.target, setup.test, setup.style, setup.classifier,
        config, setup.source_examples,
        fingerprints(config, setup.pool, setup.target, setup.test),
    )  # fmt: skip
    sources = setup.sources
    classifier = setup.classifier
    specs = plan_runs(config)
    rows = execute(specs, ctx)
    table = [{**rows[s.key], "sweep": s.sweep} for s in specs]  # a shared run: once per sweep
    baselines = [_identity_row(setup)] if config.baselines.identity else []
    pq.write_table(pa.Table.from_pylist(table), storage.join(config.out, "results.parquet"))
    text, figures, stats = report(ctx, sources, table, baselines)
    storage.write_bytes(storage.join(config.out, "summary.md"), text.encode())
    seconds = time.perf_counter() - started
    record = {
        "config": config.model_dump(mode="json", by_alias=True),
        "rows": table,
        "baselines": baselines,
        "summary": stats,
        "seconds": seconds,
        "distinct_runs": len(rows),
        "classifier_heldout_acc": classifier.heldout_accuracy,
    }
    storage.write_bytes(storage.join(config.out, "results.json"), json.dumps(record).encode())
    return StudyResult(config.out, table, len(rows), text, figures, seconds)
