"""`twist adapt` (init modes, retrieval levels, Ray Train fine-tuning) and the study's plan."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from ray_twist.adapt import ADAPT_FILE, INIT_METHODS, AdaptConfig, adapt, init_adapter, run_name
from ray_twist.backbone import load_backbone
from ray_twist.data import Task, apply_style, make_task
from ray_twist.features import Featurizer, task_key
from ray_twist.initialise import RETRIEVAL_FILE
from ray_twist.pool import Pool
from ray_twist.recipes.study import build_world_backbone, plan_runs, summarise
from ray_twist.recipes.study.config import StudyConfig
from ray_twist.retrieval import RetrievalSettings
from ray_twist.train.config import DeepSpeedSettings, ResourceSettings, TrainingSettings

FAST = TrainingSettings(
    epochs=2,
    lr=1e-2,
    batch_size=4,
    val_fraction=0.25,
    early_stopping_patience=1,
    checkpoint_every_steps=None,
)
ONE_WORKER = ResourceSettings(num_workers=1, cpus_per_worker=0.5)


@pytest.fixture(scope="module")
def featurizer() -> Featurizer:
    return Featurizer()


def _peft_loads(base: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    PeftModel.from_pretrained(load_backbone(base).model, adapter_dir)
    return load_file(str(Path(adapter_dir, "adapter_model.safetensors")))


def _softmax(x: np.ndarray, tau: float) -> np.ndarray:
    e = np.exp((x - x.max()) / tau)
    return e / e.sum()


# ------------------------------------------------------------------ initialisations


@pytest.mark.parametrize("init", ["twist", "uniform", "dense-svd-avg"])
def test_merged_inits_are_peft_adapters(
    t5_pool: tuple[str, str], featurizer: Featurizer, tmp_path: Path, init: str
) -> None:
    pool_uri, base = t5_pool
    pool = Pool.open(pool_uri)
    config = AdaptConfig(init=init, rank=3)  # type: ignore[arg-type]
    weights = init_adapter(pool, make_task("sailor", 8), str(tmp_path), config, featurizer)
    assert sum(weights.values()) == pytest.approx(1.0) and set(weights) == set(pool.sources)
    if init != "twist":
        assert len(set(weights.values())) == 1  # 1/N each
    tensors = _peft_loads(base, str(tmp_path))
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {3}


def test_dense_svd_avg_equals_uniform(
    t5_pool: tuple[str, str], featurizer: Featurizer, tmp_path: Path
) -> None:
    """Same weights, dense vs factored SVD: the products B·A agree to SVD precision."""
    pool = Pool.open(t5_pool[0])
    task = make_task("sailor", 8)
    merged = {}
    for init in ("uniform", "dense-svd-avg"):
        out = tmp_path / init
        init_adapter(pool, task, str(out), AdaptConfig(init=init, rank=4), featurizer)  # type: ignore[arg-type]
        merged[init] = load_file(str(out / "adapter_model.safetensors"))
    for key in merged["uniform"]:
        if "lora_A" in key:
            b_key = key.replace("lora_A", "lora_B")
            delta = {i: m[b_key] @ m[key] for i, m in merged.items()}
            assert torch.allclose(delta["uniform"], delta["dense-svd-avg"], atol=1e-5)


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_lambda_picks_the_retrieval_level(
    t5_pool: tuple[str, str], featurizer: Featurizer, tmp_path: Path, lam: float
) -> None:
    """λ=1: softmax of task-level (style key · cluster key) scores only; λ=0: instance-level
    (input key · source input key) only — computed here by hand from the pool's keys."""
    pool = Pool.open(t5_pool[0])
    task = make_task("sailor", 12, seed=3)
    key = task_key(task, featurizer)
    tau = 0.2
    config = AdaptConfig(
        init="twist",
        rank=2,
        retrieval=RetrievalSettings.model_validate({"lambda": lam, "tau": tau}),
    )
    weights = init_adapter(pool, task, str(tmp_path), config, featurizer)

    def cos(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        return keys @ (q / np.linalg.norm(q))

    if lam == 1.0:
        expected = _softmax(cos(key.style_key, pool.source_cluster_keys()), tau)
    else:
        expected = _softmax(cos(key.input_key, pool.input_keys), tau)
    assert [weights[s] for s in pool.sources] == pytest.approx(expected.tolist(), abs=1e-6)
    record = json.loads((tmp_path / RETRIEVAL_FILE).read_text())
    assert record["lambda"] == lam and record["weights"] == weights


def test_run_names_follow_the_settings(t5_pool: tuple[str, str]) -> None:
    pool = Pool.open(t5_pool[0])
    task = make_task("sailor", 8)
    names = {run_name(task, AdaptConfig(init=i), pool, t5_pool[1]) for i in INIT_METHODS}
    assert len(names) == 4
    same = run_name(task, AdaptConfig(storage_path="/elsewhere"), pool, t5_pool[1])
    assert same == run_name(task, AdaptConfig(), pool, t5_pool[1])
    assert run_name(task, AdaptConfig(rank=2), pool, t5_pool[1]) != same


def test_bad_adapt_inputs_are_refused(
    t5_pool: tuple[str, str], tiny_backbones: dict[str, str], tmp_path: Path
) -> None:
    task = make_task("sailor", 8)
    with pytest.raises(ValueError, match="pass a pool"):
        adapt(task, str(tmp_path), AdaptConfig(init="twist"))
    with pytest.raises(ValueError, match="needs base_model"):
        adapt(task, str(tmp_path), AdaptConfig(init="scratch"))
    with pytest.raises(ValueError, match="not the base model of the pool"):
        adapt(task, str(tmp_path), AdaptConfig(base_model=tiny_backbones["gpt2"]), t5_pool[0])
    with pytest.raises(ValueError, match="invalid target task name"):
        adapt(Task("a/b", ["x"], ["y"]), str(tmp_path), AdaptConfig(init="scratch"), t5_pool[0])


# ------------------------------------------------------------------ Ray Train + DeepSpeed


@pytest.mark.parametrize("init", ["twist", "scratch"])
def test_adapt_fine_tunes_on_ray_train(
    ray_session, t5_pool: tuple[str, str], tmp_path: Path, init: str
) -> None:
    """The sources' loop (Ray Train + DeepSpeed) with a validation split and early stopping;
    the output dir is a PEFT adapter of rank q plus the metrics and retrieval records."""
    pool_uri, base = t5_pool
    config = AdaptConfig(
        init=init,
        rank=3,
        training=FAST,  # type: ignore[arg-type]
        deepspeed=DeepSpeedSettings(zero_stage=0),
        resources=ONE_WORKER,
        base_model=base if init == "scratch" else None,
    )
    out = tmp_path / "adapter"
    pool = pool_uri if init == "twist" else None  # scratch needs no pool
    result = adapt(make_task("sailor", 16), str(out), config, pool)
    tensors = _peft_loads(base, str(out))
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {3}
    record = json.loads((out / ADAPT_FILE).read_text())
    assert record["init"] == init and record["target"] == "sailor" and record["rank"] == 3
    assert record["metrics"]["steps"] == len(result.history) >= 3
    assert record["metrics"]["first_val_loss"] is not None
    assert any("val_loss" in row for row in record["history"])
    assert (out / RETRIEVAL_FILE).exists() == (init == "twist")
    if init == "twist":
        assert result.weights is not None and sum(result.weights.values()) == pytest.approx(1.0)


def test_local_mode_runs_back_to_back_in_one_process(
    ray_session, t5_pool: tuple[str, str], tmp_path: Path
) -> None:
    """`num_workers: 0` (the study's setting): Ray Train local mode inside one Ray task, twice
    in the same worker process, each with its own one-process DeepSpeed group; the local
    checkpoints are not left behind."""
    import ray

    pool_uri, base = t5_pool
    config = AdaptConfig(
        init="scratch",
        rank=2,
        training=FAST.model_copy(update={"checkpoint_every_steps": 2}),
        deepspeed=DeepSpeedSettings(zero_stage=0),
        resources=ResourceSettings(num_workers=0),
        base_model=base,
    )

    scratch = tmp_path / "tmp"
    scratch.mkdir()

    def two_runs() -> list[tuple[int, dict]]:
        import os

        tempfile.tempdir = str(scratch)  # where this process's checkpoints go
        try:
            outs = [adapt(make_task("sailor", 12), str(tmp_path / f"a{i}"), config) for i in (0, 1)]
        finally:
            tempfile.tempdir = None
        return [(os.getpid(), r.metrics) for r in outs]

    runs = ray.get(ray.remote(num_cpus=1)(two_runs).remote())
    assert len({pid for pid, _ in runs}) == 1
    for i, (_, metrics) in enumerate(runs):
        assert metrics["world_size"] == 1 and metrics["steps"] >= 3
        assert {t.shape[0] for k, t in _peft_loads(base, str(tmp_path / f"a{i}")).items()
                if "lora_A" in k} == {2}  # fmt: skip
    assert not list(scratch.glob("ray-twist-checkpoint-*"))


# ------------------------------------------------------------------ the study


def test_study_plan_dedupes_shared_runs() -> None:
    config = StudyConfig(out="x", resources=ONE_WORKER)
    specs = plan_runs(config)
    main = [s for s in specs if s.sweep == "main"]
    assert len(main) == 5 * 4 * 3
    distinct = {s.key for s in specs}
    # per seed: λ∈{1,0}, τ∈{0.02,0.5}, q∈{1,2,4,16,32}, top-k∈{1,2,4} and the merge order
    # truncate_then_sum are new; the rest is the main grid
    assert len(distinct) == 60 + 3 * (2 + 2 + 5 + 3 + 1)
    assert len({s.name for s in specs}) == len(distinct)


def test_summarise_means_and_spread() -> None:
    rows = [
        {"init": "twist", "g": g, "g_rule": None, "acc": 1.0, "acc_rule": None, "bleu": 2.0}
        for g in (10.0, 20.0, 30.0)
    ]
    [entry] = summarise(rows, ["init"])
    assert entry["n"] == 3 and entry["g"] == pytest.approx(20.0)
    assert entry["g_std"] == pytest.approx(np.std([10.0, 20.0, 30.0]))
    assert entry["g_rule"] is None


def test_paired_table_compares_inits_seed_by_seed() -> None:
    from ray_twist.recipes.study.report import paired_table

    rows = [
        {"init": init, "fraction": 0.01, "seed": seed, "g": g, "train_loss": loss}
        for init, seed, g, loss in [("twist", 0, 20.0, 2.5), ("uniform", 0, 19.0, 2.6),
                                    ("twist", 1, 18.0, 2.4), ("uniform", 1, 19.0, 2.5),
                                    ("twist", 2, 30.0, 1.0), ("scratch", 2, 1.0, 9.0)]
    ]  # fmt: skip
    *_, line = paired_table(rows).splitlines()
    # seed 2 has no uniform run: two pairs; ΔG +1 and −1, Δloss −0.1 twice
    assert line == "| 0.01 | 2 | +0.00 | 1 | -0.100 | 2 |"


def test_world_backbone_is_a_loadable_seq2seq(tmp_path: Path) -> None:
    from ray_twist.generation import generate
    from ray_twist.recipes.study.config import WorldBackboneSettings

    path = build_world_backbone(str(tmp_path / "base"), WorldBackboneSettings(pretrain_steps=2))
    backbone = load_backbone(path)
    assert backbone.family == "seq2seq" and len(backbone.tokenizer) < 400
    sentence = make_task("pirate", 1, seed=42).targets[0]
    ids = backbone.tokenizer(apply_style("sailor", sentence))["input_ids"]
    assert backbone.tokenizer.unk_token_id not in ids  # the world's vocabulary covers it
    assert len(generate(backbone, ["my friend is here."], max_new_tokens=4)) == 1
    assert build_world_backbone(str(tmp_path / "base"), WorldBackboneSettings()) == path  # cached
