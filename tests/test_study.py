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
        yaml.safe_dump({**STUDY, "out": str(out), "base_model": packaged_minilm_path()})
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
