"""Bulk restyling on real Ray Data: complete, equal to plain generation, resumable, bad rows
kept; instance mode over a pool equal, row by row, to PEFT with that row's merge."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
from peft import PeftModel
from retrieval_reference import as_matrix, check

from ray_twist.backbone import Backbone, load_backbone, save_random_lora
from ray_twist.cli import main
from ray_twist.features import TaskKey
from ray_twist.generation import GenerationSettings, generate
from ray_twist.initialise import merge_weighted
from ray_twist.lora import RowAdapters, read_adapter
from ray_twist.merge import MergeSources
from ray_twist.pool import Pool, SourceEntry, add_sources, pool_merge_sources
from ray_twist.restyle import (
    SUMMARY_FILE,
    restyle_corpus,
    text_id,
)
from ray_twist.restyle.actor import RestyleJob, Restyler, _styler
from ray_twist.restyle.config import RestyleCorpusConfig
from ray_twist.restyle.inputs import _parse_line
from ray_twist.retrieval import InstanceRetrievalSettings
from ray_twist.settings import load_yaml

# Ray workers cannot import this test module: ship the toy row styler below by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORDS = ["a", "the", "old", "dog", "sun", "runs", "sleeps", "near", "under", "river", "green"]
GOOD = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 6)) for i in range(30)]
LONG = " ".join(["word"] * 80)
BAD = {"b0": None, "b1": "", "b2": "   \t", "b3": LONG}
RUN = {"batch_size": 4, "max_new_tokens": 6, "max_input_tokens": 32, "rows_per_part": 6}


def _output(uri: Path) -> pa.Table:
    return pq.read_table(uri).sort_by("id")


def _errors(uri: Path) -> dict[str, str]:
    table = pq.read_table(uri / "_errors")
    return dict(
        zip(table.column("id").to_pylist(), table.column("reason").to_pylist(), strict=True)
    )


def _written(uri: Path) -> int:
    """Rows in the output parts written so far (what a resumed run must skip)."""
    return pq.read_table(uri).num_rows if any(uri.glob("part-*.parquet")) else 0


def _adapted(base: str, adapter: str) -> Backbone:
    backbone = load_backbone(base)
    backbone.model = PeftModel.from_pretrained(backbone.model, adapter).merge_and_unload().eval()
    return backbone


@pytest.fixture(scope="module")
def setup(tiny_backbones, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("restyle")
    base = tiny_backbones["t5"]
    adapter = save_random_lora(base, root / "formal", seed=3, rank=4)
    ids = [f"r{i:02d}" for i in range(len(GOOD))] + list(BAD)
    texts = GOOD + list(BAD.values())
    pq.write_table(pa.table({"id": ids, "text": texts}), root / "corpus.parquet")
    rows = [{"id": i, "text": t} for i, t in zip(ids[: len(GOOD)], GOOD, strict=True)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": str(root), "base": base, "adapter": adapter}


@pytest.fixture(scope="module")
def full_run(setup, ray_session) -> tuple[Path, dict]:
    out = Path(setup["root"]) / "full"
    summary = restyle_corpus(
        f"{setup['root']}/corpus.parquet", str(out), setup["base"], setup["adapter"],
        concurrency=(1, 2), **RUN,
    )  # fmt: skip
    return out, summary


def test_full_run_is_complete_and_equals_generate(setup, full_run) -> None:
    out, summary = full_run
    n = len(GOOD) + len(BAD)
    assert summary["rows_in"] == n and summary["rows_skipped_existing"] == 0
    assert summary["rows_written"] == len(GOOD) and summary["errors"] == len(BAD)
    assert summary["rows_processed"] == n
    assert json.loads((out / SUMMARY_FILE).read_text())["rows_written"] == len(GOOD)

    table = _output(out)
    assert table.column("id").to_pylist() == [f"r{i:02d}" for i in range(len(GOOD))]
    assert table.column("input").to_pylist() == GOOD
    assert set(table.column("style").to_pylist()) == {"formal"}
    backbone = _adapted(setup["base"], setup["adapter"])
    expected = generate(backbone, GOOD, max_new_tokens=6, max_input_tokens=32, batch_size=4)
    assert table.column("output").to_pylist() == expected
    assert any(expected) and len(set(expected)) > 1

    errors = _errors(out)
    where = pq.read_table(out / "_errors").sort_by("id")  # Parquet: the row in its file
    assert set(where.column("file").to_pylist()) == {f"{setup['root']}/corpus.parquet"}
    assert where.column("line").to_pylist() == [len(GOOD) + k + 1 for k in range(len(BAD))]
    assert errors["b0"] == "missing text (null)"
    assert errors["b1"] == errors["b2"] == "empty text"
    assert errors["b3"].startswith("too long:") and "max_input_tokens=32" in errors["b3"]


def _block_errors_dir(out: Path) -> None:
    """A fault from outside: a plain file where the run writes `_errors/`, so the first part
    with bad rows fails to write and the run dies after the parts before it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "_errors").write_text("in the way")


def test_killed_run_resumes_to_the_same_output(setup, full_run) -> None:
    out = Path(setup["root"]) / "resumed"
    args = (f"{setup['root']}/corpus.parquet", str(out), setup["base"], setup["adapter"])
    _block_errors_dir(out)  # the bad rows are the corpus's last part
    with pytest.raises(Exception, match="_errors"):
        restyle_corpus(*args, **RUN)
    (out / "_errors").unlink()
    partial = _written(out)  # rows in output parts written before the failure
    n = len(GOOD) + len(BAD)
    assert 0 < partial < n
    assert json.loads((out / SUMMARY_FILE).read_text())["status"] == "running"
    with pytest.raises(ValueError, match="different settings.*settings"):
        restyle_corpus(*args, **{**RUN, "max_new_tokens": 7})

    summary = restyle_corpus(*args, **RUN)
    assert summary["rows_skipped_existing"] == partial
    assert summary["rows_processed"] == n - partial
    assert _output(out).equals(_output(full_run[0]))
    assert _errors(out) == _errors(full_run[0])


def test_text_lines_and_jsonl_records_keep_bad_ones_as_errors(setup, ray_session) -> None:
    root = Path(setup["root"])
    lines = [GOOD[0].encode(), b"caf\xe9 au lait", b"", GOOD[1].encode()]
    (root / "lines.txt").write_bytes(b"\n".join(lines) + b"\n")
    out = root / "out-lines"
    summary = restyle_corpus(str(root / "lines.txt"), str(out), setup["base"], None, **RUN)
    assert summary["rows_in"] == summary["rows_processed"] == 4
    assert sorted(_output(out).column("id").to_pylist()) == sorted(map(text_id, GOOD[:2]))
    assert sorted(_errors(out).values()) == ["empty text", "undecodable: not UTF-8 at byte 3"]

    jsonl = [
        json.dumps({"text": GOOD[2]}),
        "{not json",
        "[1, 2]",
        "",  # blank lines are not records
        json.dumps({"id": 7, "text": 3}),
        json.dumps({"id": "j", "text": None}),
        b"\xff".decode("latin-1"),
    ]
    lines = [line.encode("latin-1") for line in jsonl]
    records = [r for line in lines if (r := _parse_line(line, "jsonl", "text", "id"))]
    assert [(r["id"], r["reason"]) for r in records] == [
        (text_id(GOOD[2]), None),
        (text_id("{not json"), "invalid JSON line: Expecting property name enclosed in double "
         "quotes: line 1 column 2 (char 1)"),
        (text_id("[1, 2]"), "JSON line is a list, not an object"),
        ("7", "text is a int, not a string"),
        ("j", "missing text (null)"),
        (text_id("\ufffd"), "undecodable: not UTF-8 at byte 0"),
    ]  # fmt: skip


# a JSONL corpus of the GOOD rows with bad lines between them: {line number: (id, reason)}
JSONL_BAD = {
    3: ("x1", "missing text (null)"),
    8: (text_id("{oops"), "invalid JSON line: Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)"),
    19: ("x2", "text is a int, not a string"),
    27: (text_id("[1]"), "JSON line is a list, not an object"),
}  # fmt: skip
_KILLED_DRIVER = """
import sys, ray
from ray_twist.restyle import restyle_corpus
ray.init(address=sys.argv[1], log_to_driver=False)
restyle_corpus(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], batch_size=4,
               max_new_tokens=6, max_input_tokens=32, rows_per_part=1, read_range_bytes=97)
"""


def _bad_jsonl(path: Path) -> None:
    lines, good = [], iter(enumerate(GOOD))
    while len(lines) < len(GOOD) + len(JSONL_BAD) + 1:
        number = len(lines) + 1
        if number in JSONL_BAD:
            key = JSONL_BAD[number][0]
            bad = {3: {"id": key, "text": None}, 19: {"id": key, "text": 5}}
            lines.append(json.dumps(bad[number]) if number in bad else
                         "{oops" if number == 8 else "[1]")  # fmt: skip
        elif number == 12:
            lines.append("   ")  # a blank line is no record, but still a line
        else:
            i, text = next(good)
            lines.append(json.dumps({"id": f"r{i:02d}", "text": text}))
    path.write_text("\n".join(lines) + "\n")


def test_killed_driver_resumes_a_many_range_jsonl_read_exactly_once(
    setup, full_run, ray_session, tmp_path
) -> None:
    """One JSONL file read as many ranges (97 bytes each), its driver killed from outside
    mid-run, then resumed with other ranges (250 bytes): every row written exactly once,
    each equal to the single-range Parquet run of the same rows, the finished lines skipped,
    and each bad line in `_errors/` with its file and line number."""
    source, out = tmp_path / "bad.jsonl", tmp_path / "out"
    _bad_jsonl(source)
    address = ray_session.get_runtime_context().gcs_address
    args = [str(source), str(out), setup["base"], setup["adapter"]]
    driver = subprocess.Popen([sys.executable, "-c", _KILLED_DRIVER, address, *args])
    try:
        deadline = time.monotonic() + 240
        while not _written(out) and time.monotonic() < deadline:  # a part with rows
            assert driver.poll() is None, "the driver ended before writing a part"
            time.sleep(0.02)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    partial, settled = -1, time.monotonic()
    while time.monotonic() - settled < 2.0:  # its actors die with it: no part lands later
        if _written(out) != partial:
            partial, settled = _written(out), time.monotonic()
        time.sleep(0.2)
    total = len(GOOD) + len(JSONL_BAD)
    assert 0 < partial < len(GOOD)
    assert json.loads((out / SUMMARY_FILE).read_text())["status"] == "running"

    summary = restyle_corpus(*args, batch_size=4, max_new_tokens=6, max_input_tokens=32,
                             rows_per_part=6, read_range_bytes=250)  # fmt: skip
    assert summary["rows_in"] == total and summary["rows_skipped_existing"] >= partial
    assert summary["rows_processed"] == total - summary["rows_skipped_existing"]
    table = _output(out)
    assert table.num_rows == len(GOOD)  # exactly once
    assert table.select(["id", "input", "output"]).equals(
        _output(full_run[0]).select(["id", "input", "output"])
    )
    errors = pq.read_table(out / "_errors").sort_by("line")
    assert errors.num_rows == len(JSONL_BAD)
    assert set(errors.column("file").to_pylist()) == {str(source)}
    got = zip(errors.column("line").to_pylist(), errors.column("id").to_pylist(),
              errors.column("reason").to_pylist(), strict=True)  # fmt: skip
    assert {line: (key, reason) for line, key, reason in got} == JSONL_BAD


def test_a_small_merge_budget_restyles_like_a_large_one(t5_pool, ray_session, tmp_path) -> None:
    """Instance mode with a 1-byte factor budget (one row merged at a time) writes exactly
    the rows of the default budget (a whole part at once)."""
    pool_uri, base = t5_pool
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"m{k}", "text": t}) + "\n"
                              for k, t in enumerate(GOOD[:8])))  # fmt: skip
    tables = []
    for budget in (1, 1 << 30):
        out = tmp_path / f"out{budget}"
        restyle_corpus(str(source), str(out), pool=pool_uri, rank=2, top_k=2, batch_size=4,
                       max_new_tokens=6, rows_per_part=8, merge_budget_bytes=budget)  # fmt: skip
        tables.append(_output(out))
    # the same outputs; the retrieval weights to float rounding (the featurizer embeds each
    # chunk as its own padded batch)
    assert tables[0].drop(["weights"]).equals(tables[1].drop(["weights"]))
    assert tables[0].num_rows == 8
    for small, large in zip(*(t.column("weights").to_pylist() for t in tables), strict=True):
        assert [k for k, _ in small] == [k for k, _ in large]
        np.testing.assert_allclose([v for _, v in small], [v for _, v in large], atol=1e-6)
    job = RestyleJob("in", "out", base, None, "instance", None, GenerationSettings(), 24,
                     "text", "id", batch_size=4, pool=pool_uri,
                     retrieval=InstanceRetrievalSettings(rank=2, top_k=2))  # fmt: skip
    sources = Pool.open(pool_uri).sources
    one = pool_merge_sources(Pool.open(pool_uri)).rows(
        torch.full((1, len(sources)), 1 / len(sources)), "instance", rank=2
    )
    row_bytes = sum(2 * (f.a.shape[2] + f.b.shape[1]) * 4 for f in one.values())
    restyler = Restyler(job)  # rows merged at once: whole batches when one fits, else fewer
    for budget, rows in [(1, 1), (3 * row_bytes, 3), (10 * row_bytes, 8), (1 << 40, None)]:
        restyler.job, restyler.chunk_rows = replace(job, merge_budget_bytes=budget), None
        got = restyler._merge_chunk(GOOD)
        assert got == rows if rows else got > 1000 and got % 4 == 0


class _LengthStyler:
    """A toy row styler: each row's source weights follow its length (no pool needed)."""

    def __init__(self, adapters: list[str]) -> None:
        self.sources = MergeSources(["a", "b"], [read_adapter(a) for a in adapters])

    def __call__(self, texts: list[str]) -> tuple[RowAdapters, list[dict[str, float]]]:
        share = torch.tensor([min(len(t) / 60, 1.0) for t in texts])
        weights = torch.stack([share, 1 - share], dim=1)
        names = self.sources.names
        return self.sources.rows(weights, "instance", rank=2), [
            dict(zip(names, row.tolist(), strict=True)) for row in weights
        ]


def test_row_styler_extension_point(setup, ray_session) -> None:
    root = Path(setup["root"])
    second = save_random_lora(setup["base"], root / "second", seed=4, rank=2)
    adapters = [setup["adapter"], second]
    out = root / "instance"
    summary = restyle_corpus(
        str(root / "corpus.jsonl"), str(out), setup["base"], None, mode="instance",
        style="blend", row_styler=lambda _backbone: _LengthStyler(adapters), **RUN,
    )  # fmt: skip
    assert summary["rows_written"] == len(GOOD)
    table = _output(out)
    styler = _LengthStyler(adapters)
    factors, weights = styler(GOOD)
    expected = generate(load_backbone(setup["base"]), GOOD, max_new_tokens=6, batch_size=4,
                        max_input_tokens=32, row_factors=factors)  # fmt: skip
    assert table.column("output").to_pylist() == expected
    assert [dict(row) for row in table.column("weights").to_pylist()] == weights


def test_modes_need_their_source_of_style(setup) -> None:
    with pytest.raises(ValueError, match="pass pool"):
        restyle_corpus("x.parquet", "out", setup["base"], None, mode="instance")
    with pytest.raises(ValueError, match="not both"):
        restyle_corpus("x.parquet", "out", setup["base"], setup["adapter"], pool="p")
    with pytest.raises(ValueError, match="apply only with a pool"):
        restyle_corpus("x.parquet", "out", setup["base"], setup["adapter"], top_k=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        restyle_corpus("x.parquet", "out", setup["base"], None, mode="nope")


def test_instance_mode_resumes_and_each_row_equals_peft_with_its_merge(
    t5_pool, ray_session, tmp_path, capsys
) -> None:
    """Per-row retrieval + rank-q merge over a pool, killed at its last part and finished by
    `twist restyle --pool`: every row's output equals that row alone through PEFT with an
    adapter merged from the row's own recorded weights."""
    pool_uri, base = t5_pool
    texts, ids = GOOD[:10], [f"i{k}" for k in range(10)]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [*ids, "bad"], "text": [*texts, " "]}), source)
    out = tmp_path / "out"
    _block_errors_dir(out)  # the bad row is in the last part
    with pytest.raises(Exception, match="_errors"):
        restyle_corpus(str(source), str(out), pool=pool_uri, rank=2, top_k=2, batch_size=4,
                       max_new_tokens=6, rows_per_part=4)  # fmt: skip
    (out / "_errors").unlink()
    partial = _written(out)
    assert 0 < partial < len(ids) + 1
    cli = ["restyle", "--pool", pool_uri, "--input", str(source), "--output", str(out),
           "--mode", "instance", "--rank", "2", "--top-k", "2", "--batch-size", "4",
           "--max-new-tokens", "6"]  # fmt: skip
    capsys.readouterr()
    assert main(cli) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_skipped_existing"] == partial
    assert summary["rows_processed"] == len(ids) + 1 - partial

    table = _output(out)
    assert table.column("id").to_pylist() == ids
    assert table.column("input").to_pylist() == texts
    assert _errors(out) == {"bad": "empty text"}
    sources = Pool.open(pool_uri).sources
    weights = [dict(row) for row in table.column("weights").to_pylist()]
    for row in weights:
        assert len(row) == 2 and set(row) <= set(sources)  # top-2 of the pool's sources
        assert sum(row.values()) == pytest.approx(1.0)
    assert len({tuple(sorted(row.items())) for row in weights}) > 1  # per row, not per corpus
    outputs = table.column("output").to_pylist()
    assert len(set(outputs)) > 1
    merge = pool_merge_sources(Pool.open(pool_uri))
    for k, (text, row, got) in enumerate(zip(texts, weights, outputs, strict=True)):
        [adapter] = merge_weighted(merge, [str(tmp_path / f"ref{k}")], [row], 2, progress=False)
        assert generate(_adapted(base, adapter), [text], max_new_tokens=6) == [got], text


# near one anchor each, and (the last two) between two: balanced weights, where the merge
# orders differ most
NEAR_ANCHORS = ["the old dog sleeps near the river", "a green sun rises",
                "she runs under the bridge", "the dog runs under the sun",
                "a dog walks on the bridge"]  # fmt: skip
LAM, TAU, TOP_K, RANK = 0.7, 0.2, 2, 2


@pytest.mark.parametrize(
    ("mode", "style", "order"),
    [("instance", None, "truncate_then_sum"), ("instance", "k-b", None),
     ("mixture", None, None), ("mixture", "k-c", None)],
)  # fmt: skip
def test_written_weights_follow_the_retrieval_formula(
    keyed_pool, featurizer, ray_session, tmp_path, capsys, mode, style, order
) -> None:
    """The weights `twist restyle --pool` writes equal R_s computed here from the pool's keys
    (`retrieval_reference`): λ with a style (a pool source's style key), the instance level
    alone without one, as `retrieval_applied` records. Every row equals that row alone
    through PEFT with its own merge: instance, rank q in the order asked (`--merge-order`,
    which changes the outputs); mixture, the exact ("linear") weighted sum."""
    pool_uri, base = keyed_pool
    source = tmp_path / "in.parquet"
    ids = [f"w{k}" for k in range(len(NEAR_ANCHORS))]
    pq.write_table(pa.table({"id": ids, "text": NEAR_ANCHORS}), source)
    out = tmp_path / "out"
    cli = ["restyle", "--pool", pool_uri, "--input", str(source), "--output", str(out),
           "--mode", mode, "--lambda", str(LAM), "--tau", str(TAU), "--top-k", str(TOP_K),
           "--rank", str(RANK), "--batch-size", "4", "--max-new-tokens", "6"]  # fmt: skip
    cli += ["--style", style] if style else []
    cli += ["--merge-order", order] if order else []
    capsys.readouterr()
    assert main(cli) == 0
    printed = json.loads(capsys.readouterr().out)
    pool = Pool.open(pool_uri)
    table = _output(out)
    assert table.column("id").to_pylist() == ids
    weights = [dict(row) for row in table.column("weights").to_pylist()]
    query = pool.style_keys[pool.sources.index(style)] if style else None
    check(pool, as_matrix(pool, weights), query, featurizer.encode(NEAR_ANCHORS), LAM, TAU, TOP_K)
    applied = {"lambda": LAM if style else 0.0,
               "levels": ["task", "instance"] if style else ["instance"], "tau": TAU,
               "top_k": TOP_K}  # fmt: skip
    if mode == "instance":
        applied.update(rank=RANK, merge_order=order or "sum_then_truncate")
    record = json.loads((out / SUMMARY_FILE).read_text())
    assert record["retrieval_applied"] == printed["retrieval_applied"] == applied
    assert record["job"]["retrieval"]["lam"] == applied["lambda"]  # what resume compares
    # each row's output: PEFT with that row's merge (instance: rank q in the order asked, and
    # sum_then_truncate to compare; mixture: the exact, untruncated weighted sum)
    merge = pool_merge_sources(pool)
    outputs = table.column("output").to_pylist()
    used = applied.get("merge_order")
    others = []
    for k, (text, row) in enumerate(zip(NEAR_ANCHORS, weights, strict=True)):
        ref = str(tmp_path / f"ref{k}")
        if mode == "mixture":
            merge_weighted(merge, [ref], [row], 1, method="linear", progress=False)
        else:
            merge_weighted(merge, [ref], [row], RANK, progress=False, merge_order=used)
        assert generate(_adapted(base, ref), [text], max_new_tokens=6) == [outputs[k]], text
        if used == "truncate_then_sum":
            merge_weighted(merge, [ref + "s"], [row], RANK, progress=False)
            others += generate(_adapted(base, ref + "s"), [text], max_new_tokens=6)
    assert used != "truncate_then_sum" or others != outputs  # the order changed the rows


def test_cli_takes_exactly_one_of_pool_or_adapter(capsys, tmp_path) -> None:
    args = ["restyle", "--input", "in.jsonl", "--output", str(tmp_path / "out")]
    for extra, message in [
        (["--pool", "p", "--adapter", "a"], "argument --adapter: not allowed with argument --pool"),
        ([], "one of the arguments --adapter --pool is required"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(args + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    for extra, message in [  # refused before any Ray work
        (["--adapter", "a", "--rank", "2"], "retrieval settings (rank) apply only with a pool"),
        (["--pool", "p", "--mode", "adapted"], "mode 'adapted' restyles with one adapter"),
        (["--adapter", "a", "--mode", "instance"], "adapter is for adapted mode"),
    ]:
        assert main(args + extra) == 2
        assert message in capsys.readouterr().err


def test_job_config() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_yaml(root / "jobs/configs/restyle_corpus.yaml", RestyleCorpusConfig)
    assert cfg.pool and cfg.adapter is None and cfg.retrieval is not None
    with pytest.raises(ValueError, match="exactly one of adapter"):
        RestyleCorpusConfig(input="in", output="out", adapter="a", pool="p")


def test_actors_open_the_generation_their_run_started_at(t5_pool, tmp_path) -> None:
    """An actor started after a commit still restyles with the run's generation (one output,
    one generation); once garbage collection has dropped it, the actor says so."""
    uri, base = str(tmp_path / "pool"), t5_pool[1]
    shutil.copytree(t5_pool[0], uri)
    started = Pool.open(uri)
    job = RestyleJob("in", "out", base, None, "mixture", None, GenerationSettings(), 24, "text",
                     "id", pool=uri, pool_generation=started.generation,
                     retrieval=InstanceRetrievalSettings())  # fmt: skip
    rng = np.random.default_rng(0)

    def commit() -> None:  # a new generation: the first source with another key
        name = started.sources[0]
        key = TaskKey(rng.normal(size=384), rng.normal(size=384), 5)
        entry = SourceEntry(name, started.adapter_dir(name), key)
        add_sources(uri, [entry], base, keep_generations=2, gc_min_age_s=0)

    commit()
    backbone = load_backbone(base)
    assert _styler(job, backbone, "cpu").pool.generation == started.generation
    commit()
    with pytest.raises(RuntimeError, match=rf"generation {started.generation} is gone.*new output"):
        _styler(job, backbone, "cpu")
