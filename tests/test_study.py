"""The low-resource study end to end (jobs/low_resource.py), tiny, on the offline real-text
backbone: BERT2BERT warm-started from the packaged MiniLM."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ray_twist.backbone import load_backbone, packaged_minilm_path
from ray_twist.recipes.study.runs import RunSpec, finished_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
from low_resource import main  # noqa: E402

STUDY = {
    "world": {
        "target": "sailor",
        "sources": ["pirate", "shouty"],
        "n_source": 16,
        "n_target": 16,
        "n_test": 6,
        "seed": 0,
    },  # fmt: skip
    "source_lora": {"r": 2, "alpha": 2},  # the backbone's default LoRA targets
    "source_training": {
        "epochs": 1,
        "max_steps": 2,
        "batch_size": 8,
        "checkpoint_every_steps": None,
    },  # fmt: skip
    "fractions": [0.25],
    "inits": ["scratch", "twist"],
    "seeds": [0],
    "rank": 2,
    "training": {"epochs": 1, "max_steps": 2, "batch_size": 4, "checkpoint_every_steps": None},
    "resources": {"num_workers": 0, "cpus_per_worker": 1},
    "ablations": {
        "fraction": 0.25,
        "lambdas": [1.0, 0.0],
        "taus": [0.5],
        "ranks": [2],
        "top_ks": [None],
        "merge_orders": ["sum_then_truncate"],  # truncate_then_sum: tests/test_merge_order.py
    },
    "evaluation": {
        "max_new_tokens": 6,
        "batch_size": 8,
        "classifier_texts_per_style": 8,
        "umap_texts_per_group": 6,
    },  # fmt: skip
}


def test_minilm_warm_starts_the_same_bert2bert_every_time() -> None:
    """The new cross-attention is seeded: every worker and session loads one base model
    (without disturbing the caller's RNG), and adapters record where it came from."""
    import torch

    first = load_backbone(packaged_minilm_path())
    assert first.family == "encoder-decoder"
    assert type(first.model).__name__ == "EncoderDecoderModel"
    assert first.model.config._name_or_path == packaged_minilm_path()
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    second = load_backbone(packaged_minilm_path()).model.state_dict()
    assert torch.rand(1) == expected
    cross = [k for k in second if "crossattention" in k]
    assert cross and all(torch.equal(v, second[k]) for k, v in first.model.state_dict().items())


def test_study_job_runs_and_resumes(ray_session, tmp_path: Path) -> None:
    """Sources trained and keyed into a pool, every planned run adapted + scored, the
    results table, the summary and the three figures; a re-run redoes nothing."""
    out = tmp_path / "study"
    config = tmp_path / "study.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **STUDY,
                "out": str(out),
                "base_model": packaged_minilm_path(),
                "allow_untrained_base": True,
            }  # the bare encoder, warm-started on the fly
        )  # fmt: skip
    )
    assert main(["--config", str(config)]) == 0

    table = pq.read_table(out / "results.parquet").to_pylist()
    # main: scratch + twist (λ=0.5, τ=0.1); the λ sweep adds λ=1 and λ=0, the τ sweep τ=0.5;
    # rank 2 and top-k all coincide with the main twist run
    assert sorted(r["sweep"] for r in table).count("main") == 2
    assert {(r["init"], r["lam"], r["tau"]) for r in table} == {
        ("scratch", 0.5, 0.1),
        ("twist", 0.5, 0.1),
        ("twist", 1.0, 0.1),
        ("twist", 0.0, 0.1),
        ("twist", 0.5, 0.5),
    }
    for row in table:
        assert 0.0 <= row["acc"] <= 100.0 and math.isfinite(row["bleu"])
        assert row["train_loss"] > 0 and math.isfinite(row["train_loss"])
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 5
    record = json.loads((out / "results.json").read_text())
    assert record["distinct_runs"] == 5 and 0.0 <= record["classifier_heldout_acc"] <= 100.0
    for figure in ("fig2_g_vs_fraction.png", "fig4_g_vs_rank.png", "fig5_style_umap.png"):
        assert (out / figure).stat().st_size > 1000
    assert "twist" in (out / "summary.md").read_text()

    stamps = {p.name: p.stat().st_mtime_ns for p in runs}
    assert main(["--config", str(config)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps

    # a finished run is reused only while what it read still holds: a changed pool
    # (re-clustered, retrained) reruns the runs that read it, a changed setup reruns all
    by_init = {}
    for path in runs:
        record = json.loads(path.read_text())
        # a row's `steps` is the steps trained; these runs use the study's budget (None)
        fields = {f: record["row"][f] for f in RunSpec.__dataclass_fields__ if f != "steps"}
        spec = RunSpec(**fields)
        by_init[spec.init] = (spec, record["fingerprints"])
    (scratch, scratch_read), (twist, current) = by_init["scratch"], by_init["twist"]
    assert set(current) == {"setup", "pool"} and scratch_read == {"setup": current["setup"]}
    assert finished_row(str(out), twist, current) is not None
    repooled = current | {"pool": "another generation"}
    assert finished_row(str(out), scratch, repooled) is not None
    assert finished_row(str(out), twist, repooled) is None
    assert finished_row(str(out), scratch, current | {"setup": "other"}) is None


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_real_text_study_reads_files_and_reports_baselines(
    ray_session, tiny_backbones: dict[str, str], tmp_path: Path
) -> None:
    """The real-text path: a pool from its own build config over data files, target and test
    pairs from files, a judge from a labelled table; identity and full-data baseline rows and
    the samples section in the report."""
    from ray_twist.data import make_task, style_corpus

    def pairs(style: str, n: int, seed: int) -> list[dict]:
        return [{"source": s, "target": t} for s, t in make_task(style, n, seed=seed).pairs]

    files = {
        name: _write_jsonl(tmp_path / f"{name}.jsonl", pairs(style, n, seed))
        for name, style, n, seed in [("pirate", "pirate", 16, 0), ("shouty", "shouty", 16, 1),
                                     ("train", "sailor", 20, 2), ("test", "sailor", 6, 3)]
    }  # fmt: skip
    judge = [{"text": t, "label": y} for t, y in style_corpus(8, seed=0)]
    pool = {
        "base_model": tiny_backbones["bert2bert"],
        "lora": {"r": 2, "alpha": 2},
        "sources": [{"name": n, "data": files[n], "max_examples": 12} for n in ("pirate", "shouty")],
        "training": {"epochs": 1, "max_steps": 2, "batch_size": 8, "checkpoint_every_steps": None},
        "deepspeed": {"zero_stage": 0},
        "resources": {"num_workers": 0, "cpus_per_worker": 1},
        "pool": str(tmp_path / "pool"),
        "storage_path": str(tmp_path / "sources"),
    }  # fmt: skip
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    study = {
        **{k: v for k, v in STUDY.items() if k not in ("world", "source_lora", "source_training")},
        "out": str(tmp_path / "study"),
        "real": {"pool": str(tmp_path / "pool.yaml"), "train": files["train"],
                 "test": files["test"], "n_test": 4, "style": "sailor",
                 "judge_data": _write_jsonl(tmp_path / "judge.jsonl", judge),
                 "judge_texts_per_style": 6},
        "baselines": {"identity": True, "full_data_steps": 3},
        "ablations": None,
    }  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["--config", str(tmp_path / "study.yaml")]) == 0

    record = json.loads((tmp_path / "study" / "results.json").read_text())
    assert {(r["sweep"], r["init"]) for r in record["rows"]} == {
        ("main", "scratch"), ("main", "twist"), ("full-data", "scratch")
    }  # fmt: skip
    full = next(r for r in record["rows"] if r["sweep"] == "full-data")
    assert full["fraction"] == 1.0 and full["n_train"] == 20 and full["steps"] == 3
    (identity,) = record["baselines"]
    assert identity["init"] == "identity" and len(identity["examples"]) == 4
    assert [e["output"] for e in identity["examples"]] == [
        e["source"] for e in identity["examples"]
    ]
    summary = (tmp_path / "study" / "summary.md").read_text()
    assert "## baselines" in summary and "identity" in summary and "## Samples" in summary
    twist = next(r for r in record["rows"] if r["init"] == "twist")
    assert set(json.loads(twist["weights"])) == {"pirate", "shouty"}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"world": {"target": "klingon"}}, "unknown styles"),
        ({"ablations": {"lambdas": [2.0]}}, "ablations.lambdas"),
        ({"resources": {"num_workers": -1}}, "resources.num_workers"),
    ],
)
def test_bad_study_configs_name_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], patch: dict, message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "o"), **patch}))
    assert main(["--config", str(config)]) == 2
    assert message in capsys.readouterr().err
