"""`twist demo --quick` end to end on the session's Ray: every phase, every artefact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

# ~2 minutes on an idle 2-core machine; allow for a heavily loaded one
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def demo(ray_session, tmp_path_factory) -> dict:
    """Run the quick demo once through the CLI; its `demo.json` record."""
    from ray_twist.cli import main

    workdir = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--workdir", str(workdir)]) == 0
    return json.loads((workdir / "demo.json").read_text())


def test_every_listed_artefact_exists(demo):
    assert set(demo["phases"]) == {"base model", "pool", "adapt", "evaluate", "serve", "restyle"}
    for name, path in demo["artefacts"].items():
        assert Path(path).exists(), f"{name}: {path}"


def test_pool_has_the_quick_sources(demo):
    from ray_twist.pool import Pool
    from ray_twist.recipes.demo import QUICK_SOURCES, TARGET

    pool = Pool.open(demo["artefacts"]["pool"])
    assert sorted(pool.sources) == sorted(QUICK_SOURCES)
    assert TARGET not in pool.sources  # held out
    assert pool.base_model == demo["artefacts"]["base model"]


def test_eval_table_has_finite_twist_and_scratch_rows(demo):
    rows = json.loads(Path(demo["artefacts"]["evaluation table"]).read_text())
    assert rows == demo["eval"]
    assert [r["init"] for r in rows] == ["twist", "scratch"]
    for row in rows:
        for key in ("acc", "acc_rule", "bleu", "g"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["init"], key)
        assert row["n_test"] == demo["plan"]["test_examples"]
    for init in ("twist", "scratch"):
        summary = Path(demo["artefacts"][f"{init} evaluation"], "summary.json")
        assert json.loads(summary.read_text())["n"] == demo["plan"]["test_examples"]


def test_http_answers_in_both_modes(demo):
    served = json.loads(Path(demo["artefacts"]["served responses"]).read_text())
    assert served == demo["served"]
    for mode in ("adapted", "instance"):
        answer = served[mode]
        assert answer["mode"] == mode
        assert len(answer["outputs"]) == len(served["texts"]) > 0
        assert all(isinstance(o, str) and o.strip() for o in answer["outputs"]), answer
    # instance mode merges pool sources per sentence: its weights name pool sources
    assert all(set(w) <= set(demo["plan"]["sources"]) for w in served["instance"]["retrieval"])


def test_bulk_restyle_keeps_every_row(demo):
    inputs = Path(demo["artefacts"]["bulk input"]).read_text().splitlines()
    table = pq.read_table(demo["artefacts"]["restyled corpus (Parquet)"])
    assert table.num_rows == len(inputs) == demo["plan"]["corpus_rows"]
    assert sorted(table.column("id").to_pylist()) == sorted(str(i) for i in range(len(inputs)))
    assert demo["restyle"]["errors"] == 0


def test_serve_is_shut_down(demo, ray_session):
    """Serve ran on the suite's Ray: the demo must leave no controller behind."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME

    actors = ray_session.util.list_named_actors(all_namespaces=True)
    assert not [a for a in actors if a["name"] == SERVE_CONTROLLER_NAME]
