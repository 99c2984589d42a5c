"""Pool builds: real Ray Train + DeepSpeed on a tiny T5, Ray Data keys, one commit per build,
and `ray job submit` to a two-node cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from ray_nodes import local_cluster, submit_job, wait_for_job
from rich.console import Console
from safetensors.torch import load_file

import ray_twist.build.pipeline as build_module
from ray_twist.backbone import load_backbone
from ray_twist.build import (
    BuildPoolError,
    BuildReport,
    SourceOutcome,
    build_pool,
    source_tasks,
    summary_table,
    training_hash,
)
from ray_twist.build.config import BuildPoolConfig
from ray_twist.build.progress import latest_state
from ray_twist.features import Featurizer, task_key
from ray_twist.pool import Pool, PoolMismatchError
from ray_twist.settings import ConfigError, load_yaml
from ray_twist.train import TrainManyError, TrainResult

REPO = Path(__file__).resolve().parents[1]


def synthetic(styles: list[str], n: int = 64, seed: int = 0) -> dict[str, Any]:
    return {"synthetic": {"styles": styles, "n_per_style": n, "seed": seed}}


def config(root: Path, sources: list[dict[str, Any]], **overrides: Any) -> BuildPoolConfig:
    """A tiny-T5 build: few steps, 1 worker and half a CPU per source."""
    data: dict[str, Any] = {
        "base_model": {"tiny": "t5"},
        "sources": sources,
        "training": {"max_steps": 8, "lr": 1e-2, "batch_size": 8, "checkpoint_every_steps": None},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
        "pool": str(root / "pool"),
        "storage_path": str(root / "train"),
        **overrides,
    }
    return BuildPoolConfig.model_validate(data)


def run_dirs(root: Path) -> list[str]:
    """Training runs under the storage path (the tiny base model lives beside them)."""
    return sorted(p.name for p in (root / "train").iterdir() if p.name != "base_models")


# ------------------------------------------------------------------ config, no Ray


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "build.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": {"tiny": "t6"},
                "sources": [
                    synthetic(["pirate", "klingon"]),
                    {"name": "notes", "data": "notes.txt"},
                    {"name": "a/b", "data": "x.jsonl"},
                    {"name": "pirate", "data": "p.jsonl", "synthetic": {"styles": ["formal"]}},
                ],
                "training": {"lr": 0, "epoch": 3},
                "deepspeed": {"zero_stage": 4},
                "pool": "p",
                "storage_path": "s",
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_yaml(path, BuildPoolConfig)
    message = str(info.value)
    for expected in [
        "build.yaml: base_model.tiny: Value error, unknown tiny model 't6'",
        "build.yaml: sources.0.synthetic.styles: Value error, unknown styles ['klingon']",
        "build.yaml: sources.1: Value error, a text file has no pairs: set objective: denoising",
        "build.yaml: sources.2.name: Value error, invalid source name 'a/b'",
        "build.yaml: sources.3: Value error, give exactly one of data (a file URI) or synthetic",
        "build.yaml: training.lr: Input should be greater than 0",
        "build.yaml: training.epoch: Extra inputs are not permitted",
        "build.yaml: deepspeed.zero_stage: Input should be less than or equal to 3",
    ]:
        assert expected in message, message
    path.write_text(
        "base_model: {tiny: t5}\npool: p\nstorage_path: s3://bucket/runs\n"
        "sources: [{synthetic: {styles: [pirate]}}, {name: pirate, data: p.jsonl}]\n"
    )
    with pytest.raises(ConfigError, match=r"sources: Value error, .*repeated: \['pirate'\]"):
        load_yaml(path, BuildPoolConfig)
    path.write_text(
        "base_model: {tiny: t5}\npool: p\nstorage_path: s3://bucket/runs\n"
        "sources: [{synthetic: {styles: [pirate]}}]\n"
    )
    with pytest.raises(ConfigError, match="base_model.tiny is built under storage_path"):
        load_yaml(path, BuildPoolConfig)


def test_example_configs_validate() -> None:
    synthetic_cfg = load_yaml(REPO / "jobs/configs/build_pool_synthetic.yaml", BuildPoolConfig)
    assert synthetic_cfg.base_model.tiny == "t5"
    assert [t.name for t in source_tasks(synthetic_cfg)] == [
        "pirate",
        "sailor",
        "shouty",
        "emphatic",
    ]
    gpu = load_yaml(REPO / "jobs/configs/build_pool_t5_gpu.yaml", BuildPoolConfig)
    assert gpu.resources.gpus_per_worker == 1 and gpu.deepspeed.precision == "bf16"
    assert gpu.base_model.path and {s.objective for s in gpu.sources} == {"parallel", "denoising"}
    for name in ("build_pool_bible.yaml", "build_pool_bible_demo.yaml"):
        bible = load_yaml(REPO / "jobs/configs" / name, BuildPoolConfig)
        # one cluster per source: the task-level term tells the BBE -> X siblings apart
        assert bible.clustering.n_clusters == len(bible.sources), name


def test_training_hash_covers_what_changes_the_weights(
    tmp_path: Path, tiny_backbones: dict[str, str]
) -> None:
    base = tiny_backbones["t5"]
    cfg = config(tmp_path, [synthetic(["pirate"])])
    same = training_hash(cfg, base)

    def changed(**overrides: Any) -> BuildPoolConfig:
        return config(tmp_path, [synthetic(["pirate"])], **overrides)

    assert training_hash(changed(training={"max_steps": 8, "lr": 0.02}), base) != same
    assert training_hash(changed(lora={"r": 4}), base) != same
    assert training_hash(changed(resources={"num_workers": 2}), base) != same
    # placement and bookkeeping do not change the result
    assert training_hash(changed(resources={"cpus_per_worker": 2}), base) == same
    assert training_hash(changed(deepspeed={"zero_stage": 3}), base) == same
    assert training_hash(changed(fault={"max_failures": 5}), base) == same
    keep_cadence = {"max_steps": 8, "lr": 1e-2, "batch_size": 8, "checkpoint_every_steps": 1}
    assert training_hash(changed(training=keep_cadence), base) == same


def test_progress_reads_the_newest_readable_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "pirate-0123456789ab"
    for stamp, step in [("2026-01-01_00-00-01.000001", 4), ("2026-01-01_00-00-02.000001", 8)]:
        (run / f"checkpoint_{stamp}").mkdir(parents=True)
        state = {"step": step, "history": [{"step": step, "loss": 1.0 / step}]}
        (run / f"checkpoint_{stamp}" / "trainer_state.json").write_text(json.dumps(state))
    (run / "checkpoint_2026-01-01_00-00-03.000001").mkdir()  # still being written
    latest = latest_state(str(tmp_path), run.name)
    assert latest is not None and latest["step"] == 8
    assert latest_state(str(tmp_path), "not-started") is None


def test_summary_table_renders_every_source() -> None:
    metrics = {"steps": 8, "first_loss": 10.5, "loss": 9.25, "samples_per_s": 40.0, "train_s": 1.6}
    report = BuildReport(
        pool="/pools/p",
        generation=3,
        committed=True,
        seconds=12.0,
        sources={
            "pirate": SourceOutcome("pirate", "trained", "pirate-abc", metrics, cluster=0),
            "shouty": SourceOutcome("shouty", "failed", "shouty-def", error="RuntimeError: boom"),
        },
    )
    console = Console(record=True, width=200)
    console.print(summary_table(report))
    text = console.export_text()
    assert "generation 3 (committed); 1 trained, 0 skipped, 1 failed" in text
    assert "10.500 → 9.250" in text and "pirate-abc" in text
    assert "shouty: RuntimeError: boom" in text  # failures are listed under the table
    report.generation, report.committed = None, False
    console.print(summary_table(report))
    assert "no pool yet (unchanged)" in console.export_text()


# ------------------------------------------------------------------ real Ray + DeepSpeed


def adapter_tensors(pool: Pool, name: str, base: str) -> dict[str, torch.Tensor]:
    """The contract: PeftModel.from_pretrained(base, DIR) loads a pool adapter unchanged."""
    from peft import PeftModel

    directory = pool.adapter_dir(name)
    PeftModel.from_pretrained(load_backbone(base).model, directory)
    return load_file(str(Path(directory, "adapter_model.safetensors")))


def test_builds_train_only_new_or_changed_sources(
    ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 sources → pool; again → nothing trains; 1 changed + 1 failing → only those run."""
    # 1. four sources of two families train concurrently; one pool generation
    first = config(tmp_path, [synthetic(["pirate", "shouty", "emphatic"]), synthetic(["sailor"])])
    report = build_pool(first, progress=False)
    assert sorted(report.trained) == ["emphatic", "pirate", "sailor", "shouty"]
    pool = Pool.open(first.pool)
    assert (pool.generation, report.generation, report.committed) == (1, 1, True)
    base = pool.base_model
    assert base == str(tmp_path / "train" / "base_models" / "tiny-t5-seed0")
    weights = {name: adapter_tensors(pool, name, base) for name in pool.sources}
    for a, b in [("pirate", "sailor"), ("pirate", "shouty"), ("shouty", "emphatic")]:
        assert weights[a].keys() == weights[b].keys()
        assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)
    metrics = pool.manifest["sources"]["pirate"]["metrics"]
    assert metrics["steps"] == 8 and metrics["run"] == report.sources["pirate"].run
    # the synthetic families come out as clusters
    cluster = dict(zip(pool.sources, pool.cluster_of.tolist(), strict=True))
    assert cluster["pirate"] == cluster["sailor"] != cluster["shouty"] == cluster["emphatic"]
    assert {n: o.cluster for n, o in report.sources.items()} == cluster
    # keys from the Ray Data pipeline equal keys from a plain in-process loop
    featurizer = Featurizer()
    for task in source_tasks(first)[:2]:
        local = task_key(task, featurizer)
        i = pool.sources.index(task.name)
        np.testing.assert_allclose(pool.style_keys[i], local.style_key, atol=1e-5)
        np.testing.assert_allclose(pool.input_keys[i], local.input_key, atol=1e-5)
    assert len(run_dirs(tmp_path)) == 4

    # 2. nothing changed: nothing trains, nothing is committed
    report = build_pool(first, progress=False)
    assert report.trained == [] and len(report.skipped) == 4 and not report.committed
    assert Pool.open(first.pool).generation == 1 and len(run_dirs(tmp_path)) == 4
    # what the pool would refuse after training is refused before it
    for key, change in [("featurizer", {"model": "/models/other"})]:  # any LoRA layout fits
        sources = first.model_dump()["sources"]
        with pytest.raises(PoolMismatchError, match=f"{key}.*build into a new pool"):
            build_pool(config(tmp_path, sources, **{key: change}), progress=False)
    assert len(run_dirs(tmp_path)) == 4

    # 3. sailor's data changes and a new source fails for good: only those two go to
    #    training (sailor under a new run name, so its old checkpoint is not resumed), the
    #    rest is committed, the error names the failed source. Training is stubbed here:
    #    step 1 ran it for real.
    handed: list[str] = []
    old_sailor_run = pool.manifest["sources"]["sailor"]["metrics"]["run"]

    def biblical_fails(tasks, *args, **kwargs):
        handed.extend(t.name for t in tasks)
        runs = {t.name.rsplit("-", 1)[0]: t.name for t in tasks}
        done = TrainResult(runs["sailor"], pool.adapter_dir("pirate"), {}, history=[])
        error = RuntimeError("worker died\nfor good")
        raise TrainManyError({runs["biblical"]: error}, {runs["sailor"]: done})

    monkeypatch.setattr(build_module, "train_many", biblical_fails)
    second = config(
        tmp_path,
        [
            synthetic(["pirate", "shouty", "emphatic"]),
            synthetic(["sailor"], seed=1),
            synthetic(["biblical"], n=16),
        ],
        featurizer={"key_examples": 5},  # sources keyed from now on: on 5 sampled examples
    )
    with pytest.raises(BuildPoolError, match="biblical: RuntimeError: for good") as info:
        build_pool(second, progress=False)
    report = info.value.report
    assert sorted(h.rsplit("-", 1)[0] for h in handed) == ["biblical", "sailor"]
    assert report.sources["sailor"].run in handed and old_sailor_run not in handed
    assert (report.trained, report.failed) == (["sailor"], ["biblical"])
    assert sorted(report.skipped) == ["emphatic", "pirate", "shouty"]
    pool = Pool.open(second.pool)
    assert pool.generation == 2 and "biblical" not in pool.sources
    assert pool.manifest["sources"]["sailor"]["metrics"]["run"] == report.sources["sailor"].run
    sailor = next(t for t in source_tasks(second) if t.name == "sailor")
    sampled = task_key(sailor.sample(n=5, seed=second.training.seed), featurizer)
    full = task_key(sailor, featurizer)
    i = pool.sources.index("sailor")
    np.testing.assert_allclose(pool.style_keys[i], sampled.style_key, atol=1e-5)
    assert not np.allclose(pool.style_keys[i], full.style_key, atol=1e-3)


# ------------------------------------------------------------------ ray job submit


def test_ray_job_submit_trains_on_two_nodes(ray_session, tmp_path: Path) -> None:
    """`ray job submit` the build to a head + worker cluster on this machine: the source's
    2 training workers (1.5 of each node's 2 CPUs) can only be placed one per node."""
    from ray.util.state import list_actors

    training = {"max_steps": 8, "lr": 1e-2, "batch_size": 4, "checkpoint_every_steps": None}
    cfg = config(
        tmp_path,
        [synthetic(["pirate"], n=16)],
        training=training,
        resources={"num_workers": 2, "cpus_per_worker": 1.5},
    )
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    entrypoint = ["python", "jobs/build_pool.py", "--config", str(path)]
    with local_cluster(workers=1, num_cpus=2) as cluster:
        assert set(cluster.node_ids) == {"head", "worker"}
        job_id = submit_job(cluster.dashboard, REPO, entrypoint)
        status, logs = wait_for_job(cluster.dashboard, job_id, timeout=720)
        assert status == "SUCCEEDED", logs[-5000:]
        workers = list_actors(
            address=cluster.dashboard,
            filters=[("class_name", "=", "RayTrainWorker")],
            detail=True,
            timeout=120,
        )
    # Ray Train V2's worker actors (dead by now, still listed) ran on both nodes
    assert len(workers) >= 2 and {w.node_id for w in workers} == set(cluster.node_ids.values()), (
        [(w.node_id, w.state) for w in workers],
        cluster.node_ids,
    )
    pool = Pool.open(cfg.pool)
    metrics = pool.manifest["sources"]["pirate"]["metrics"]
    # 16 examples split over 2 workers, 4 each per step: 2 steps per epoch x 3 epochs
    assert pool.sources == ["pirate"] and metrics["steps"] == 6
    assert f"[progress] pirate ({metrics['run']}): step 6/6" in logs, logs[-5000:]
    # the suite's own Ray survived the cluster's shutdown
    assert ray_session.get(ray_session.put(7)) == 7
