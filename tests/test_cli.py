"""The `twist` CLI end to end on a tiny T5 pool: add, show, init, merge (one and many)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from ray_twist.backbone import load_backbone
from ray_twist.cli import main
from ray_twist.data import make_task, write_task_jsonl
from ray_twist.initialise import RETRIEVAL_FILE
from ray_twist.lora import read_adapter
from ray_twist.pool import Pool, pool_merge_sources


def test_pool_show_json(t5_pool, capsys) -> None:
    pool, _ = t5_pool
    capsys.readouterr()
    assert main(["pool", "show", "--pool", pool, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert sorted(shown["sources"]) == ["formal", "pirate", "sailor"]
    assert shown["generation"] == 3
    assert all(info["n_examples"] == 20 for info in shown["sources"].values())
    assert main(["pool", "show", "--pool", pool]) == 0
    assert "pirate" in capsys.readouterr().out


def test_init_retrieves_and_writes_a_loadable_adapter(t5_pool, tmp_path) -> None:
    pool, base = t5_pool
    target = write_task_jsonl(make_task("pirate", 10, seed=99), tmp_path / "target.jsonl")
    out = tmp_path / "init_out"
    assert main(["init", "--pool", pool, "--target", target, "--out", str(out),
                 "--rank", "3", "--lambda", "1.0", "--tau", "0.05"]) == 0  # fmt: skip
    record = json.loads((out / RETRIEVAL_FILE).read_text())
    weights = record["weights"]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert max(weights, key=weights.get) in {"pirate", "sailor"}  # the nautical family
    assert read_adapter(out).config["r"] == 3
    PeftModel.from_pretrained(load_backbone(base).model, str(out))


def test_merge_weights_and_targets_equal_library_merge(t5_pool, tmp_path, ray_session) -> None:
    root = tmp_path
    pool = Pool.open(t5_pool[0])
    weights = {"pirate": 0.7, "formal": 0.3}
    one = root / "merge_one"
    assert main(["merge", "--pool", str(pool.uri), "--weights", json.dumps(weights),
                 "--rank", "2", "--out", str(one)]) == 0  # fmt: skip
    [expected] = pool_merge_sources(pool).merge([weights], 2)
    got = read_adapter(one).modules
    for module, (a, b) in expected.items():
        assert torch.allclose(got[module][1] @ got[module][0], b @ a, atol=1e-6)

    data = write_task_jsonl(make_task("formal", 8, seed=5), root / "t_formal.jsonl")
    table = root / "targets.jsonl"
    table.write_text(
        json.dumps({"name": "w1", "weights": {"sailor": 1.0}}) + "\n"
        + json.dumps({"name": "w2", "weights": json.dumps(weights)}) + "\n"
        + json.dumps({"name": "d1", "data": data}) + "\n"
    )  # fmt: skip
    many = root / "merge_many"
    assert main(["merge", "--pool", str(pool.uri), "--targets", str(table), "--rank", "2",
                 "--out", str(many)]) == 0  # fmt: skip
    for name in ("w1", "w2", "d1"):
        assert (many / name / "adapter_model.safetensors").is_file()
    w2 = read_adapter(many / "w2").modules
    for module, (a, b) in expected.items():
        assert torch.allclose(w2[module][1] @ w2[module][0], b @ a, atol=1e-6)
    retrieved = json.loads((many / "d1" / RETRIEVAL_FILE).read_text())["weights"]
    assert sum(retrieved.values()) == pytest.approx(1.0)

    spread = root / "merge_spread"  # the same targets as Ray tasks, featurized on Ray Data
    assert main(["merge", "--pool", str(pool.uri), "--targets", str(table), "--rank", "2",
                 "--out", str(spread), "--concurrency", "2", "--chunk-size", "1"]) == 0  # fmt: skip
    assert json.loads((spread / "d1" / RETRIEVAL_FILE).read_text())["weights"] == pytest.approx(
        retrieved, abs=1e-6
    )
    for name in ("w1", "w2"):
        alone, spread_out = read_adapter(many / name).modules, read_adapter(spread / name).modules
        for module, (a, b) in alone.items():
            a2, b2 = spread_out[module]
            assert torch.allclose(b2 @ a2, b @ a, atol=1e-6), (name, module)


def test_bad_input_is_named(t5_pool, tmp_path, capsys) -> None:
    pool = t5_pool[0]
    assert main(["merge", "--pool", pool, "--weights", '{"nope": 1}', "--rank", "2",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "unknown source" in capsys.readouterr().err
    bad = tmp_path / "targets.jsonl"
    bad.write_text(json.dumps({"name": "../evil", "weights": {"pirate": 1}}) + "\n")
    assert main(["merge", "--pool", pool, "--targets", str(bad), "--rank", "2",
                 "--out", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "../evil" in capsys.readouterr().err
    missing = tmp_path / "targets2.jsonl"
    missing.write_text(json.dumps({"name": "a"}) + "\n")
    assert main(["merge", "--pool", pool, "--targets", str(missing), "--rank", "2",
                 "--out", str(tmp_path / "z")]) == 2  # fmt: skip
    assert "line 1" in capsys.readouterr().err
    assert main(["pool", "show", "--pool", str(tmp_path / "nothing")]) == 2
    assert "no pool" in capsys.readouterr().err


def test_real_demo_names_a_missing_corpus(tmp_path, capsys) -> None:
    """`twist demo --real` on a corpus directory that is not there fails at once, naming it."""
    assert main(["demo", "--real", "--corpus", str(tmp_path / "no-bible")]) == 2
    assert "no-bible" in capsys.readouterr().err
