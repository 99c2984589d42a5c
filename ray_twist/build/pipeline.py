"""Pool builds: train every source style's LoRA at once on Ray, key, cluster, commit once.

`build_pool(config)` is what `twist pool build --config FILE` and `jobs/build_pool.py` run:

1. read each source's task and hash it: the **data hash** (`Task.content_hash`, over the
   pairs actually trained on) and the **training hash** (base model, LoRA, training
   settings, precision, worker count: whatever changes the trained weights);
2. skip sources whose pool entry carries both hashes already; train the rest concurrently
   (`train.train_many`: one Ray Train + DeepSpeed run per source, each surviving worker
   failures by restarting from its last checkpoint);
3. key the new sources on a Ray Data actor pool (`features.task_keys`), re-cluster all
   style keys and commit one pool generation (`pool.add_sources`).

Runs are named `<source>-<12 hex of both hashes>`, so a changed source never resumes a
stale checkpoint while an identical re-run after a crash resumes where it died. A run
that fails for good does not stop the others: the finished ones are committed, then
`BuildPoolError` reports the failures (re-running retrains only those).

The report types and the summary table live in `ray_twist.build.report` (re-exported
here), the live progress display in `ray_twist.build.progress`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from rich.console import Console

from ray_twist import storage
from ray_twist.backbone import (
    absolute_model_path,
    build_tiny_backbone,
    check_trained_base,
    config_hash,
)
from ray_twist.build.config import BaseModelSettings, BuildPoolConfig, SourceSettings
from ray_twist.build.progress import expected_steps, show_progress
from ray_twist.build.report import BuildPoolError, BuildReport, SourceOutcome, summary_table
from ray_twist.data import denoising_task, make_world, read_task, read_texts
from ray_twist.data.task import Task
from ray_twist.features import TaskKey, task_keys
from ray_twist.pool import MANIFEST, Pool, PoolMismatchError, SourceEntry, add_sources
from ray_twist.settings import json_digest
from ray_twist.train import TrainManyError, TrainResult, train_many

# ---------------------------------------------------------------- inputs and hashes


def resolve_base_model(spec: BaseModelSettings, storage_path: str) -> str:
    """The base model as workers load it: an absolute local path, or an HF name.

    A tiny model is built once under `<storage_path>/base_models/` (seeded, so every build
    of the same spec gets the same weights); concurrent builds race harmlessly.
    """
    if spec.path is not None:
        return os.path.abspath(spec.path) if os.path.isdir(spec.path) else spec.path
    assert spec.tiny is not None  # BaseModelSettings allows exactly one
    fs, root = storage.resolve(storage_path)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise ValueError("base_model.tiny needs a local (or shared) storage_path")
    target = Path(root, "base_models", f"tiny-{spec.tiny}-seed{spec.seed}")
    if not (target / "config.json").is_file():
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        build_tiny_backbone(spec.tiny, tmp, seed=spec.seed)  # type: ignore[arg-type]
        try:
            os.replace(tmp, target)
        except OSError:  # another build got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _read_entry(spec: SourceSettings, seed: int) -> list[Task]:
    if spec.synthetic is not None:
        world = make_world(spec.synthetic.n_per_style, spec.synthetic.seed, spec.synthetic.styles)
        tasks = list(world.values())
        if spec.objective == "denoising":
            tasks = [denoising_task(t.targets, t.name, seed=seed) for t in tasks]
        return tasks
    assert spec.data is not None and spec.name is not None  # by SourceSettings
    if spec.objective == "denoising":
        texts = read_texts(spec.data, spec.text_column, spec.format)
        if spec.max_examples is not None and len(texts) > spec.max_examples:
            texts = random.Random(seed).sample(texts, spec.max_examples)
        return [denoising_task(texts, spec.name, seed=seed)]
    task = read_task(spec.data, spec.name, spec.format, spec.source_column, spec.target_column)
    if spec.max_examples is not None and len(task) > spec.max_examples:
        task = task.sample(n=spec.max_examples, seed=seed)
    return [task]


def source_tasks(config: BuildPoolConfig) -> list[Task]:
    """Every configured source's training pairs, in config order (denoising seeded by
    `training.seed`)."""
    return [task for spec in config.sources for task in _read_entry(spec, config.training.seed)]


def training_hash(config: BuildPoolConfig, base_model: str) -> str:
    """sha256 of the settings that change a source's trained weights.

    The base model counts as named (moving its directory retrains) and by config hash.
    Left out on purpose: ZeRO stage and offload (where optimizer state lives, not what it
    computes), CPUs/GPUs per worker, checkpoint cadence, fault handling, keys, clustering.
    """
    payload = {
        "base_model": config.base_model.model_dump(),
        "base_config_hash": config_hash(base_model),
        "lora": config.lora.model_dump(),
        "training": config.training.model_dump(exclude={"checkpoint_every_steps"}),
        "precision": config.deepspeed.precision,
        "num_workers": config.resources.num_workers,
    }
    return json_digest(payload)


def _run_name(name: str, data_hash: str, train_hash: str) -> str:
    return f"{name}-{hashlib.sha256(f'{data_hash}:{train_hash}'.encode()).hexdigest()[:12]}"


def _is_current(entry: dict[str, Any], data_hash: str, train_hash: str) -> bool:
    built_with = entry.get("metrics", {}).get("train_config_hash")
    return entry.get("data_hash") == data_hash and built_with == train_hash


def _check_pool_fits(previous: Pool, base_model: str, config: BuildPoolConfig) -> None:
    """Refuse before training what `add_sources` would refuse after it (a pool takes sources
    of any LoRA layout, so only the base model and the featurizer must match)."""
    if previous.base_config_hash != config_hash(base_model):
        raise PoolMismatchError(
            f"base_model: {base_model!r} is not the base model of the pool at {previous.uri} "
            f"({previous.base_model!r}); build into a new pool"
        )
    if previous.featurizer != config.featurizer.model:
        raise PoolMismatchError(
            f"featurizer.model: the pool at {previous.uri} is keyed with "
            f"{previous.featurizer!r}, not {config.featurizer.model!r}; build into a new pool"
        )


def _clustering_changed(previous: Pool, config: BuildPoolConfig) -> bool:
    used = previous.manifest["clustering"]
    wanted = config.clustering
    return (used["n_clusters_requested"], used["seed"]) != (wanted.n_clusters, wanted.seed)


# ---------------------------------------------------------------- the build


def _train_metrics(result: TrainResult, train_hash: str) -> dict[str, Any]:
    """What the pool keeps about a source's training (also how the next build skips it)."""
    history = result.history
    metrics: dict[str, Any] = {"run": result.name, "train_config_hash": train_hash}
    if history:
        metrics |= {
            "steps": history[-1]["step"],
            "first_loss": history[0]["loss"],
            "loss": history[-1]["loss"],
            "samples_per_s": history[-1]["samples_per_s"],
            "train_s": history[-1]["step_end"] - history[0]["step_start"],
        }
    if result.metrics.get("best_val_loss") is not None:
        metrics["best_val_loss"] = result.metrics["best_val_loss"]
    return metrics


def _existing_entries(pool: Pool) -> list[SourceEntry]:
    """Every source of `pool` as it stands: re-committing them re-clusters, rewrites nothing."""
    return [
        SourceEntry(
            name=name,
            adapter_dir=pool.adapter_dir(name),
            key=TaskKey(pool.style_keys[i], pool.input_keys[i], int(pool.n_examples[i])),
            metrics=pool.manifest["sources"][name].get("metrics", {}),
            data_hash=pool.manifest["sources"][name].get("data_hash", ""),
        )
        for i, name in enumerate(pool.sources)
    ]


def _error_line(exc: BaseException) -> str:
    """The root cause in one line (Ray wraps task errors in multi-line tracebacks)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _train(
    config: BuildPoolConfig, base_model: str, to_train: dict[str, Task], progress: bool
) -> tuple[dict[str, TrainResult], dict[str, str]]:
    """Train source → task (named by its run) concurrently: (results, errors) by run name."""
    runs = {source: task.name for source, task in to_train.items()}
    totals = {source: expected_steps(task, config) for source, task in to_train.items()}
    with show_progress(progress, runs, totals, config.storage_path):
        try:
            results = train_many(
                list(to_train.values()),
                base_model,
                config.lora,
                config.training,
                config.deepspeed,
                config.resources,
                config.storage_path,
                fault=config.fault,
                allow_untrained_base=config.allow_untrained_base,
            )
        except TrainManyError as exc:
            return exc.results, {run: _error_line(e) for run, e in exc.errors.items()}
    return results, {}


def _commit(
    config: BuildPoolConfig,
    base_model: str,
    previous: Pool | None,
    trained: list[tuple[Task, TrainResult, dict[str, Any]]],
) -> Pool | None:
    """Key the trained sources on Ray Data, re-cluster all, commit one generation.

    With nothing trained the pool is left alone, unless the clustering settings changed.
    """
    entries: list[SourceEntry] = []
    with contextlib.ExitStack() as stack:
        if trained:
            n_key = config.featurizer.key_examples
            keys = task_keys(
                [
                    task if n_key is None else task.sample(n=n_key, seed=config.training.seed)
                    for task, _, _ in trained
                ],
                absolute_model_path(config.featurizer.model),
                batch_size=config.featurizer.batch_size,
                concurrency=config.featurizer.concurrency,
                num_gpus=config.featurizer.num_gpus,
            )
            for task, result, metrics in trained:
                adapter = stack.enter_context(storage.local_dir(result.adapter_dir))
                entries.append(
                    SourceEntry(task.name, adapter, keys[task.name], metrics, task.content_hash())
                )
        elif previous is not None and _clustering_changed(previous, config):
            entries = _existing_entries(previous)
        if not entries:
            return previous
        return add_sources(
            config.pool,
            entries,
            base_model=base_model,
            featurizer=config.featurizer.model,
            n_clusters=config.clustering.n_clusters,
            seed=config.clustering.seed,
        )


def build_pool(config: BuildPoolConfig, progress: bool = True) -> BuildReport:
    """Train the sources that are new or changed, key them, re-cluster, commit one generation.

    Uses the Ray that is running (or `RAY_ADDRESS`), else starts a local one. Returns the
    report; raises `BuildPoolError` (with the report) after committing the rest if any
    source failed to train.
    """
    started = time.perf_counter()
    # local paths leave the driver absolute: Ray tasks and train workers run elsewhere
    config = config.model_copy(
        update={"pool": storage.absolute(config.pool),
                "storage_path": storage.absolute(config.storage_path)}
    )  # fmt: skip
    base_model = resolve_base_model(config.base_model, config.storage_path)
    if not config.allow_untrained_base:
        check_trained_base(base_model)  # a bare encoder fails before Ray starts
    if not ray.is_initialized():
        # worker logs would scroll the live table away; they stay in the Ray session logs
        ray.init(log_to_driver=not progress)
    tasks = source_tasks(config)
    train_hash = training_hash(config, base_model)
    has_pool = storage.exists(storage.join(config.pool, MANIFEST))
    previous = Pool.open(config.pool) if has_pool else None
    if previous is not None:
        _check_pool_fits(previous, base_model, config)
    existing = previous.manifest["sources"] if previous is not None else {}

    outcomes: dict[str, SourceOutcome] = {}
    runs: dict[str, str] = {}  # source → run, for the sources to train
    for task in tasks:
        data_hash = task.content_hash()
        entry = existing.get(task.name)
        run = _run_name(task.name, data_hash, train_hash)
        if entry is not None and _is_current(entry, data_hash, train_hash):
            outcomes[task.name] = SourceOutcome(task.name, "skipped", run, dict(entry["metrics"]))
        else:
            runs[task.name] = run
    phases = {"prepare_s": time.perf_counter() - started}

    clock = time.perf_counter()
    to_train = {t.name: dataclasses.replace(t, name=runs[t.name]) for t in tasks if t.name in runs}
    results, errors = _train(config, base_model, to_train, progress) if to_train else ({}, {})
    phases["train_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    trained = []
    for task in tasks:
        if task.name not in runs:
            continue
        run = runs[task.name]
        if run in errors:
            outcomes[task.name] = SourceOutcome(task.name, "failed", run, error=errors[run])
        elif run in results:
            metrics = _train_metrics(results[run], train_hash)
            outcomes[task.name] = SourceOutcome(task.name, "trained", run, metrics)
            trained.append((task, results[run], metrics))
    pool = _commit(config, base_model, previous, trained)
    phases["commit_s"] = time.perf_counter() - clock

    if pool is not None:
        cluster_of = dict(zip(pool.sources, pool.cluster_of.tolist(), strict=True))
        for outcome in outcomes.values():
            outcome.cluster = cluster_of.get(outcome.name)
    report = BuildReport(
        pool=config.pool,
        generation=pool.generation if pool is not None else None,
        committed=pool is not previous,
        seconds=time.perf_counter() - started,
        sources={t.name: outcomes[t.name] for t in tasks},
        phases=phases,
    )
    if report.failed:
        raise BuildPoolError(report)
    return report


def build_and_print(config: BuildPoolConfig, progress: bool = True) -> int:
    """`build_pool`, then its summary table: the body of `twist pool build` and the job.

    Returns the exit status: 0 built (or nothing to do), 1 some sources failed (the rest
    committed; their errors are printed under the table).
    """
    # logs and pipes get a wide table instead of rich's 80-column default
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        report = build_pool(config, progress=progress)
    except BuildPoolError as exc:
        console.print(summary_table(exc.report))
        return 1
    console.print(summary_table(report))
    return 0
