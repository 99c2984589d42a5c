"""What a new user hit running the pipeline on real English with a BERT2BERT base: relative
paths under Ray Train, saved encoder-decoder checkpoints, deterministic errors retried as
worker failures, the LoRA targets, untrained bases, the eval judge, and the load report."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from ray_twist.adapt import ADAPT_FILE
from ray_twist.backbone import (
    BERT2BERT_LORA_TARGETS,
    BackboneNotFoundError,
    UntrainedBaseError,
    build_tiny_backbone,
    default_lora_targets,
    load_backbone,
    packaged_minilm_path,
    save_random_lora,
)
from ray_twist.cli import main
from ray_twist.data import make_task, write_task_jsonl
from ray_twist.evaluate import bleu_scores
from ray_twist.serve.app import prepare
from ray_twist.serve.config import ServeConfig
from ray_twist.train import train_lora
from ray_twist.train.config import (
    DeepSpeedSettings,
    FaultSettings,
    LoraSettings,
    ResourceSettings,
    TrainingSettings,
)

SHORT = TrainingSettings(
    epochs=1, max_steps=2, lr=1e-2, batch_size=4, max_source_length=16, max_target_length=16,
    checkpoint_every_steps=None,
)  # fmt: skip
#: `twist adapt --config`: two steps, no validation split
ADAPT_YAML = {
    "training": {"epochs": 1, "max_steps": 2, "batch_size": 4, "val_fraction": 0.0,
                 "early_stopping_patience": None, "checkpoint_every_steps": None,
                 "max_source_length": 16, "max_target_length": 16},
    "deepspeed": {"zero_stage": 0},
}  # fmt: skip
UNTRAINED = "untrained (newly initialised) weights"


def _write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def saved_bert2bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny EncoderDecoderModel as `EncoderDecoderModel.save_pretrained` writes it: its
    config has no top-level `vocab_size` (which PEFT's adapter save used to re-read)."""
    path = build_tiny_backbone("bert2bert", tmp_path_factory.mktemp("b2b") / "base")
    config = json.loads(Path(path, "config.json").read_text())
    config.pop("vocab_size", None)
    Path(path, "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def t5_missing_a_weight(
    tiny_backbones: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The tiny T5 with one weight dropped from its checkpoint: newly initialised at load."""
    out = tmp_path_factory.mktemp("t5_missing")
    for f in Path(tiny_backbones["t5"]).iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(out / "model.safetensors"))
    del weights["decoder.block.1.layer.0.SelfAttention.q.weight"]
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


# ------------------------------------------------------------------ 1. relative paths


def test_adapt_with_relative_paths_runs_on_ray_train(
    ray_session, t5_pool: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`twist adapt --out REL --init uniform` with a relative pool and target: Ray Train
    workers run in their own directories, so every path must leave the driver absolute."""
    pool_uri, _ = t5_pool
    monkeypatch.chdir(tmp_path)
    write_task_jsonl(make_task("sailor", 8), "sailor.jsonl")
    config = dict(ADAPT_YAML, resources={"num_workers": 1, "cpus_per_worker": 0.5})
    code = main(["adapt", "--pool", os.path.relpath(pool_uri), "--target", "sailor.jsonl",
                 "--out", "runs/sailor", "--init", "uniform", "--rank", "2",
                 "--config", _write_yaml(tmp_path / "adapt.yaml", config)])  # fmt: skip
    assert code == 0
    out = tmp_path / "runs" / "sailor"
    record = json.loads((out / ADAPT_FILE).read_text())
    assert record["init"] == "uniform" and record["metrics"]["steps"] == 2
    assert Path(record["pool"]).is_absolute()
    assert {t.shape[0] for k, t in load_file(str(out / "adapter_model.safetensors")).items()
            if "lora_A" in k} == {2}  # fmt: skip


# ------------------------------------------------------------------ 2. saved BERT2BERT, fail fast


def test_a_saved_encoder_decoder_trains_and_saves_its_adapter(
    ray_session, saved_bert2bert: str, tmp_path: Path
) -> None:
    from peft import PeftModel

    result = train_lora(
        make_task("pirate", 8),
        saved_bert2bert,
        LoraSettings(r=2, alpha=2),
        SHORT,
        DeepSpeedSettings(zero_stage=0),
        ResourceSettings(num_workers=1, cpus_per_worker=0.5),
        str(tmp_path),
        "pirate",
    )
    assert [row["step"] for row in result.history] == [1, 2]
    config = json.loads(Path(result.adapter_dir, "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(BERT2BERT_LORA_TARGETS)
    PeftModel.from_pretrained(load_backbone(saved_bert2bert).model, result.adapter_dir)
    tensors = load_file(str(Path(result.adapter_dir, "adapter_model.safetensors")))
    assert any(".crossattention.self.key." in k for k in tensors)


@pytest.mark.parametrize("num_workers", [1, 0])
def test_setup_errors_fail_at_once_with_their_own_message(
    ray_session, t5_missing_a_weight: str, tmp_path: Path, num_workers: int
) -> None:
    """A base the workers refuse (1 worker: Ray Train) or cannot find (0: local mode) fails
    once, raising the original error, although 30 restarts are allowed (30 restarts take
    ~10 minutes on two cores)."""
    base, error, message = (
        (t5_missing_a_weight, UntrainedBaseError, re.escape("decoder.block.*.layer (1)"))
        if num_workers
        else (str(tmp_path / "no-such-model"), BackboneNotFoundError, "not a local directory")
    )
    started = time.perf_counter()
    with pytest.raises(error, match=message) as info:
        train_lora(
            make_task("pirate", 8),
            base,
            LoraSettings(r=2, alpha=2),
            SHORT,
            DeepSpeedSettings(zero_stage=0),
            ResourceSettings(num_workers=num_workers, cpus_per_worker=0.5),
            str(tmp_path / "runs"),
            "pirate",
            fault=FaultSettings(max_failures=30),
            allow_untrained_base=False,
        )
    assert time.perf_counter() - started < 120
    assert "not retried" in " ".join(getattr(info.value, "__notes__", []))
    if num_workers:
        assert "twist base build" in str(info.value)


# ------------------------------------------------------------------ 3. LoRA targets


def test_bert2bert_default_targets_cover_the_cross_attention(
    tiny_backbones: dict[str, str],
) -> None:
    from peft import LoraConfig, get_peft_model

    backbone = load_backbone(tiny_backbones["bert2bert"])
    targets = default_lora_targets(backbone.model.config)
    assert targets == ["query", "key", "value", "dense"]
    # a bare encoder (warm-started into BERT2BERT at load) gets the same
    assert default_lora_targets(AutoConfig.from_pretrained(packaged_minilm_path())) == targets
    model = get_peft_model(backbone.model, LoraConfig(r=2, target_modules=targets))
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    for layer in range(2):
        cross = f"base_model.model.decoder.bert.encoder.layer.{layer}.crossattention"
        for part in ("self.query", "self.key", "self.value", "output.dense"):
            assert f"{cross}.{part}" in wrapped, (cross, part)


# ------------------------------------------------------------------ 4. untrained bases


def test_untrained_bases_are_refused_before_anything_runs(
    ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare encoder (warm-started at every load) as base of `twist adapt`, `twist pool
    build` and `twist serve`: refused at once, saying which weights and what to do."""
    encoder = packaged_minilm_path()
    target = write_task_jsonl(make_task("pirate", 8), tmp_path / "pirate.jsonl")
    adapt_yaml = _write_yaml(tmp_path / "adapt.yaml", dict(ADAPT_YAML, base_model=encoder))
    build_yaml = _write_yaml(tmp_path / "build.yaml", {
        "base_model": encoder, "sources": [{"name": "pirate", "data": target}],
        "pool": str(tmp_path / "pool"), "storage_path": str(tmp_path / "runs"),
    })  # fmt: skip
    serve_yaml = _write_yaml(tmp_path / "serve.yaml", {
        "base_model": encoder, "styles": {"pirate": str(tmp_path / "adapter")},
    })  # fmt: skip
    commands = {
        "adapt": ["adapt", "--target", target, "--out", str(tmp_path / "out"),
                  "--init", "scratch", "--config", adapt_yaml],
        "pool build": ["pool", "build", "--config", build_yaml, "--no-progress"],
        "serve": ["serve", "--config", serve_yaml],
    }  # fmt: skip
    for command, argv in commands.items():
        started = time.perf_counter()
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert time.perf_counter() - started < 30, command
        assert UNTRAINED in err and "cross-attention" in err, (command, err)
        assert "twist base build" in err and "--allow-untrained-base" in err, (command, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "pool").exists()
    assert ray_session.is_initialized()  # `twist serve` stops only a Ray it started itself


def test_checkpoints_with_missing_weights_are_named(t5_missing_a_weight: str) -> None:
    assert load_backbone(t5_missing_a_weight).new_weights == [
        "decoder.block.1.layer.0.SelfAttention.q.weight"
    ]
    with pytest.raises(UntrainedBaseError, match=r"1 weights .*decoder\.block\.\*\.layer \(1\)"):
        load_backbone(t5_missing_a_weight, allow_untrained=False)


def test_allow_untrained_base_overrides_the_refusal(
    ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--allow-untrained-base`: `twist adapt` trains on the bare encoder (warm-started,
    local mode); `twist pool build` gets past the check (to the next error, a missing data
    file); a serve config with `allow_untrained_base: true` prepares."""
    encoder = packaged_minilm_path()
    target = write_task_jsonl(make_task("pirate", 4), tmp_path / "pirate.jsonl")
    config = dict(ADAPT_YAML, base_model=encoder, resources={"num_workers": 0})
    config["training"] = dict(config["training"], max_steps=1, batch_size=2)
    out = tmp_path / "out"
    code = main(["adapt", "--target", target, "--out", str(out), "--init", "scratch", "--rank",
                 "2", "--config", _write_yaml(tmp_path / "adapt.yaml", config),
                 "--allow-untrained-base"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert any(".crossattention.self.query." in k for k in tensors)

    build_yaml = _write_yaml(tmp_path / "build.yaml", {
        "base_model": encoder, "sources": [{"name": "pirate", "data": str(tmp_path / "nope.jsonl")}],
        "pool": str(tmp_path / "pool"), "storage_path": str(tmp_path / "runs"),
    })  # fmt: skip
    assert main(["pool", "build", "--config", build_yaml, "--allow-untrained-base"]) == 2
    err = capsys.readouterr().err
    assert UNTRAINED not in err and "nope.jsonl" in err

    serve = ServeConfig.model_validate({"base_model": encoder, "styles": {"pirate": "ad"}})
    with pytest.raises(UntrainedBaseError, match="twist base build"):
        prepare(serve)
    prepared = prepare(serve.model_copy(update={"allow_untrained_base": True}))
    assert prepared.styles["pirate"].adapter == str(Path("ad").absolute())


# ------------------------------------------------------------------ 5. twist eval


@pytest.fixture(scope="module")
def eval_inputs(tiny_backbones: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval")
    adapter = save_random_lora(tiny_backbones["t5"], root / "adapter", rank=2)
    test = write_task_jsonl(make_task("pirate", 4, seed=5), root / "test.jsonl")
    return adapter, test


def test_eval_refuses_to_fit_its_judge_on_the_test_set(
    eval_inputs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    adapter, test = eval_inputs
    assert main(["eval", "--adapter", adapter, "--test", test]) == 2
    err = capsys.readouterr().err
    assert "--style-data" in err and "--judge-on-test" in err


def test_eval_flags_reach_generation_and_bleu(
    eval_inputs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    adapter, test = eval_inputs
    plain = ["eval", "--adapter", adapter, "--test", test, "--judge-on-test"]
    argv = [*plain, "--json", "--max-new-tokens", "3", "--num-beams", "2", "--batch-size", "1"]
    assert main([*argv, "--no-lowercase"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["meta"]["generation"]["max_new_tokens"] == 3
    assert summary["meta"]["generation"]["num_beams"] == 2
    assert summary["meta"]["batch_size"] == 1
    assert summary["bleu_lowercase"] is False
    assert any("targets vs inputs" in note for note in summary["notes"])
    assert main(argv) == 0  # the MiniLM tokenizer is uncased: lowercase BLEU by default
    assert json.loads(capsys.readouterr().out)["bleu_lowercase"] is True
    assert main(plain) == 0  # the printed table says it too
    assert "bleu_lowercase           True" in capsys.readouterr().out


def test_bleu_compares_detokenised_text() -> None:
    """A WordPiece decode spaces out apostrophes and hyphens; the reference does not."""
    output = ["i don ' t know , it ' s well - known ."]
    reference = [["I don't know, it's well-known."]]
    assert bleu_scores(output, reference, lowercase=True)[0] == pytest.approx(100.0)
    assert bleu_scores(output, reference, lowercase=True, detokenized=False)[0] < 50.0
    assert bleu_scores(output, reference)[0] < 90.0  # cased: "I" vs "i"


# ------------------------------------------------------------------ 6. the load report


def test_the_load_report_is_one_line_once_per_process(
    t5_missing_a_weight: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """No transformers table (or progress bar) per load; one warning per model path."""
    model = str(shutil.copytree(t5_missing_a_weight, tmp_path / "t5"))  # a path not yet loaded
    with caplog.at_level(logging.WARNING, logger="ray_twist.backbone"):
        for _ in range(2):
            load_backbone(model)
        load_backbone(packaged_minilm_path())  # a warm start: 66 new weights
    ours = [r.getMessage() for r in caplog.records if r.name == "ray_twist.backbone"]
    assert [m for m in ours if model in m] == [
        f"base model {model}: 1 weights were newly initialised at load (not in "
        "the checkpoint): decoder.block.*.layer (1)"
    ]
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err and "Loading weights" not in err
