"""LoRA training on real Ray Train + real DeepSpeed (CPU, gloo) with tiny backbones."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from ray_twist.backbone import load_backbone
from ray_twist.data.task import Task
from ray_twist.settings import ConfigError, Settings, load_yaml
from ray_twist.train import (
    IGNORE_INDEX,
    tokenize_pairs,
    train_lora,
    train_many,
    wrap_lora,
)
from ray_twist.train.config import (
    DeepSpeedSettings,
    FaultSettings,
    LoraSettings,
    ResourceSettings,
    TrainingSettings,
)

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def make_task(name: str, rewrite, n: int = 48, seed: int = 0) -> Task:
    """Synthetic style task: three-word sentences rewritten by a fixed rule."""
    rng = random.Random(seed)
    sources = [" ".join(rng.sample(WORDS, 3)) for _ in range(n)]
    return Task(name, sources, [rewrite(s.split()) for s in sources])


def reverse(words: list[str]) -> str:
    return " ".join(reversed(words))


def first_last(words: list[str]) -> str:
    return f"{words[0]} {words[-1]}"


def upper(words: list[str]) -> str:
    return " ".join(w.upper() for w in words)


def falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1


def loads_with_peft(base_path: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    """The contract: PeftModel.from_pretrained(base, DIR) loads it unchanged."""
    from peft import PeftModel

    PeftModel.from_pretrained(load_backbone(base_path).model, adapter_dir)
    return load_file(str(Path(adapter_dir, "adapter_model.safetensors")))


# ------------------------------------------------------------------ config (no Ray)


class BuildConfig(Settings):
    training: TrainingSettings = TrainingSettings()
    lora: LoraSettings = LoraSettings()


def test_yaml_errors_name_file_and_dotted_key(tmp_path: Path) -> None:
    path = tmp_path / "build.yaml"
    path.write_text("training:\n  lr: 0\n  epoch: 3\nlora:\n  r: 4\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path, BuildConfig)
    message = str(info.value)
    assert "build.yaml: training.lr: Input should be greater than 0" in message
    assert "build.yaml: training.epoch: Extra inputs are not permitted" in message
    path.write_text("training:\n  lr: 0.01\nlora:\n  r: 4\n")
    loaded = load_yaml(path, BuildConfig)
    assert (loaded.training.lr, loaded.lora.r, loaded.lora.alpha) == (0.01, 4, 16.0)


def test_settings_validate_ranges() -> None:
    with pytest.raises(ValueError, match="zero_stage"):
        DeepSpeedSettings(zero_stage=4)
    with pytest.raises(ValueError, match="precision"):
        DeepSpeedSettings(precision="fp8")
    with pytest.raises(ValueError, match="early_stopping_patience"):
        TrainingSettings(early_stopping_patience=2)
    assert ResourceSettings(cpus_per_worker=0.3).cpus_per_worker == 0.3


def test_fp16_on_cpu_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="deepspeed.precision"):
        train_lora(
            make_task("t", reverse),
            "unused",
            LoraSettings(),
            TrainingSettings(),
            DeepSpeedSettings(precision="fp16"),
            ResourceSettings(),
            str(tmp_path),
            "t",
        )


def test_run_names_cannot_escape_storage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain name"):
        train_lora(
            make_task("t", reverse),
            "unused",
            LoraSettings(),
            TrainingSettings(),
            DeepSpeedSettings(),
            ResourceSettings(),
            str(tmp_path),
            "../t",
        )


# ------------------------------------------------------------------ helpers (no Ray)


def test_causal_labels_cover_only_the_target(tiny_backbones: dict[str, str]) -> None:
    tok = load_backbone(tiny_backbones["gpt2"]).tokenizer
    batch = tokenize_pairs(tok, "causal", ["alpha beta", "gamma"], ["beta", "gamma delta"], 16, 16)
    for ids, labels, mask in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        scored = labels != IGNORE_INDEX
        assert torch.equal(labels[scored], ids[scored])  # labels are the target tokens
        assert not scored[0] and scored.any()  # the prompt is never scored
        assert int(mask.sum()) == int((ids != tok.pad_token_id).sum())
        assert tok.decode(ids[scored][:-1]) in {"beta", "gamma delta"}


def test_seq2seq_labels_mask_padding(tiny_backbones: dict[str, str]) -> None:
    tok = load_backbone(tiny_backbones["t5"]).tokenizer
    batch = tokenize_pairs(tok, "seq2seq", ["a b", "c"], ["b a", "c c c c"], 16, 16)
    assert (batch["labels"][0] == IGNORE_INDEX).any()  # shorter target is padded with -100
    assert not (batch["labels"][1] == IGNORE_INDEX).any()


def test_init_adapter_config_wins(tiny_backbones: dict[str, str], tmp_path: Path) -> None:
    base = tiny_backbones["t5"]
    backbone = load_backbone(base)
    wrap_lora(backbone.model, "seq2seq", LoraSettings(r=4, alpha=4)).save_pretrained(tmp_path)
    model = wrap_lora(load_backbone(base).model, "seq2seq", LoraSettings(r=8), str(tmp_path))
    assert model.peft_config["default"].r == 4
    assert any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ real Ray + DeepSpeed


def _registered_checkpoints(run_dir: Path) -> int:
    """How many checkpoints Ray Train's controller has registered for the run (its snapshot
    file). A checkpoint dir on disk is not yet one a restart resumes from: the controller
    registers it when it next polls the workers, and a fast run writes several before then."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    with contextlib.suppress(OSError, ValueError):
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    return 0


def _kill_a_worker_after_a_registered_checkpoint(
    run_dir: Path, killed: list[str]
) -> threading.Thread:
    """A fault from outside the run: once the controller has registered a checkpoint,
    SIGKILL a Ray Train worker process (found by its Ray process title among this test's
    descendants)."""

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if _registered_checkpoints(run_dir) >= 1:
                break
            time.sleep(0.05)
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                title = " ".join(proc.cmdline())
                if title.startswith("ray::RayTrainWorker"):
                    proc.kill()
                    killed.append(f"{proc.pid}: {title.strip()}")
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_zero2_run_survives_a_worker_failure(
    ray_session, tiny_backbones: dict[str, str], tmp_path: Path
) -> None:
    """2 workers, ZeRO-2: a worker process is killed from outside once a checkpoint is
    registered; the run resumes from its latest checkpoint and finishes."""
    training = TrainingSettings(
        epochs=40,
        max_steps=30,
        lr=1e-2,
        batch_size=4,
        checkpoint_every_steps=3,
        val_fraction=0.2,
    )
    killed: list[str] = []
    killer = _kill_a_worker_after_a_registered_checkpoint(tmp_path / "reverse", killed)
    result = train_lora(
        make_task("reverse", reverse),
        tiny_backbones["t5"],
        LoraSettings(),
        training,
        DeepSpeedSettings(zero_stage=2),
        ResourceSettings(num_workers=2, cpus_per_worker=1),
        str(tmp_path),
        "reverse",
        # 2, not 1: on a loaded 2-core machine the restarted group's health check has timed out
        # once as well (a second restart, still from the latest checkpoint, which is asserted)
        fault=FaultSettings(max_failures=2),
    )
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    m = result.metrics
    assert (m["engine_class"], m["zero_stage"], m["world_size"]) == ("DeepSpeedEngine", 2, 2)
    assert m["optimizer_class"] == "DeepSpeedZeroOptimizer"
    resumed = m["resumed_from_step"]
    assert resumed and resumed % 3 == 0 and m["step"] == 30 and m["done"], (killed, m)
    assert [row["step"] for row in result.history] == list(range(1, 31))
    # the step after the checkpoint ran only after the restart: a worker-group start between
    assert result.history[resumed]["step_start"] - result.history[resumed - 1]["step_end"] > 1.0
    assert falls(result.losses), result.losses
    assert any("val_loss" in row for row in result.history)
    ckpt = Path(result.checkpoint_path)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 30
    assert len(list((ckpt / "deepspeed").rglob("*optim_states.pt"))) == 2  # one ZeRO shard/rank
    weights = loads_with_peft(tiny_backbones["t5"], result.adapter_dir)
    assert all(t.dtype == torch.float32 for t in weights.values())


def assert_trained_concurrently(spans: dict[str, tuple[float, float]]) -> None:
    """Sequential runs have disjoint step spans and a wall time of at least their sum.

    Not "all at one instant": under load a run's worker group may start only after another
    run has finished, so ask that every run shares time with some other run and that
    together they took clearly less wall time than one after the other.
    """

    def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
        return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))

    for name, span in spans.items():
        others = [overlap(span, other) for n, other in spans.items() if n != name]
        assert max(others) > 0, (name, spans)
    wall = max(e for _, e in spans.values()) - min(s for s, _ in spans.values())
    total = sum(e - s for s, e in spans.values())
    assert wall < 0.9 * total, (wall, total, spans)


def test_assert_trained_concurrently_rejects_sequential_runs() -> None:
    assert_trained_concurrently({"a": (0, 10), "b": (5, 15), "c": (12, 22)})  # a chain
    for sequential in [
        {"a": (0, 10), "b": (10.5, 20), "c": (21, 30)},
        {"a": (0, 10), "b": (2, 9), "c": (11, 30)},  # c alone
        {"a": (0, 10), "b": (9.9, 20), "c": (19.9, 30)},  # touching is not concurrent
    ]:
        with pytest.raises(AssertionError):
            assert_trained_concurrently(sequential)


def test_many_sources_train_concurrently(
    ray_session, tiny_backbones: dict[str, str], tmp_path: Path
) -> None:
    """3 sources x 2 workers x 0.3 CPU fit together in 4 CPUs, so their steps overlap."""
    base = tiny_backbones["t5"]
    init_dir = tmp_path / "init_r4"
    wrap_lora(load_backbone(base).model, "seq2seq", LoraSettings(r=4)).save_pretrained(init_dir)
    tasks = [
        make_task("reverse", reverse, seed=1),
        make_task("first_last", first_last, seed=2),
        make_task("upper", upper, seed=3),
    ]
    # ~0.1 s steps: 90 of them outlast the few seconds by which the runs' starts differ
    training = TrainingSettings(
        epochs=50, max_steps=90, lr=1e-2, batch_size=4, checkpoint_every_steps=None
    )
    results = train_many(
        tasks,
        base,
        LoraSettings(),
        training,
        DeepSpeedSettings(zero_stage=2),
        ResourceSettings(num_workers=2, cpus_per_worker=0.3),
        str(tmp_path / "runs"),
        init_adapters={"upper": str(init_dir)},
    )
    assert list(results) == ["reverse", "first_last", "upper"]
    spans = {n: (r.history[0]["step_start"], r.history[-1]["step_end"]) for n, r in results.items()}
    assert_trained_concurrently(spans)
    weights = {n: loads_with_peft(base, r.adapter_dir) for n, r in results.items()}
    for n, r in results.items():
        assert r.metrics["zero_stage"] == 2 and len(r.history) == 90
        assert falls(r.losses), (n, r.losses)
    a, b = weights["reverse"], weights["first_last"]
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    config = json.loads(Path(results["upper"].adapter_dir, "adapter_config.json").read_text())
    assert config["r"] == 4  # the init adapter's own rank wins over lora.r


def test_causal_gpt2_trains_and_stops_early(
    ray_session, tiny_backbones: dict[str, str], tmp_path: Path
) -> None:
    """Decoder-only path; a huge min_delta makes epochs 2 and 3 'no improvement'."""
    training = TrainingSettings(
        epochs=10,
        lr=1e-2,
        batch_size=6,
        val_fraction=0.25,
        early_stopping_patience=2,
        early_stopping_min_delta=1e3,
        checkpoint_every_steps=None,
    )
    result = train_lora(
        make_task("reverse", reverse, n=32),
        tiny_backbones["gpt2"],
        LoraSettings(),
        training,
        DeepSpeedSettings(zero_stage=0),
        ResourceSettings(num_workers=1),
        str(tmp_path),
        "gpt2",
    )
    assert result.metrics["stopped_early"] and result.metrics["engine_class"] == "DeepSpeedEngine"
    assert sorted({row["epoch"] for row in result.history}) == [0, 1, 2]
    assert len(result.history) == 12  # 24 training pairs / 6 per step x 3 epochs
    assert falls(result.losses), result.losses
    loads_with_peft(tiny_backbones["gpt2"], result.adapter_dir)
