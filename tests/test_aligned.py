"""Verse-aligned multi-version corpus preparation (ray_twist.data.aligned, jobs/prepare_aligned)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ray_twist.data import AlignedCorpusSettings, DataError, prepare_aligned

ROOT = Path(__file__).parents[1]
BIBLE = Path(__file__).parents[2] / "shared/data/bible"
VERSIONS = ["plain", "old", "odd"]
GROUPS = ["Gen", "Exo", "Ruth", "Mark", "Acts"]  # test: Ruth, Mark; judge: Acts


def _text(version: str, uid: str) -> str:
    return f"{version} says the words of {uid} here"


def _corpus(root: Path) -> Path:
    """Three versions; `odd` lacks Gen.2.2, `plain` has one two-word verse and a newline."""
    root.mkdir(parents=True, exist_ok=True)
    for v in VERSIONS:
        rows = []
        for g in GROUPS:
            for c in (1, 2):
                for n in (1, 2, 3):
                    uid = f"{g}.{c}.{n}"
                    if v == "odd" and uid == "Gen.2.2":
                        continue
                    text = _text(v, uid)
                    if v == "plain" and uid == "Exo.1.3":
                        text = "too short"
                    if v == "plain" and uid == "Exo.1.1":
                        text = "a verse\nover two lines"
                    rows.append({"id": uid, "text": text})
        (root / f"{v}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _settings(root: Path, **over) -> AlignedCorpusSettings:
    fields = {
        "dir": str(root),
        "versions": VERSIONS,
        "test_groups": ["Ruth", "Mark"],
        "judge_groups": ["Acts"],
        "pairs": ["plain->old", ["plain", "odd"]],
    }
    return AlignedCorpusSettings.model_validate(fields | over)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _group(uid: str) -> str:
    return uid.split(".")[0]


def test_split_pairs_judge_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = prepare_aligned(_settings(_corpus(tmp_path / "corpus")), out)

    for v in VERSIONS:
        train = (out / f"text/{v}.train.txt").read_text().splitlines()
        test = (out / f"text/{v}.test.txt").read_text().splitlines()
        # only train groups in train text; only test groups in test text
        assert all(
            _group(line.split(" of ")[1]) in {"Gen", "Exo"} for line in train if " of " in line
        )
        assert all(_group(line.split(" of ")[1]) in {"Ruth", "Mark"} for line in test)
        assert len(test) == 12
    plain_train = (out / "text/plain.train.txt").read_text().splitlines()
    assert "a verse over two lines" in plain_train  # newline collapsed
    assert "too short" not in plain_train  # < min_words
    assert len(plain_train) == 11  # 12 train verses, one too short
    union = (out / "text/all.train.txt").read_text().splitlines()
    lines = [t for v in VERSIONS for t in (out / f"text/{v}.train.txt").read_text().splitlines()]
    assert sorted(union) == sorted(set(lines)) and union != sorted(union)  # de-duplicated, shuffled

    for name in ("plain-old", "plain-odd"):
        for split, groups in (("train", {"Gen", "Exo"}), ("test", {"Ruth", "Mark"})):
            rows = _jsonl(out / f"pairs/{name}.{split}.jsonl")
            assert rows and {_group(r["id"]) for r in rows} == groups
            tgt = name.split("-")[1]
            for r in rows:  # source and target are the same verse
                assert set(r) == {"id", "source", "target"}
                assert r["target"] == _text(tgt, r["id"])
    train_ids = [r["id"] for r in _jsonl(out / "pairs/plain-odd.train.jsonl")]
    assert "Gen.2.2" not in train_ids  # missing in odd
    assert "Exo.1.3" not in train_ids  # too short in plain
    assert train_ids == sorted(train_ids, key=lambda u: (GROUPS.index(_group(u)), u))  # file order

    judge = _jsonl(out / "judge/train.jsonl")
    judge_test = _jsonl(out / "judge/test.jsonl")
    assert {_group(r["id"]) for r in judge} == {"Acts"}
    assert {r["label"] for r in judge} == set(VERSIONS) and len(judge) == 18
    assert {_group(r["id"]) for r in judge_test} == {"Ruth", "Mark"} and len(judge_test) == 36
    everything = "".join(p.read_text() for p in out.rglob("*.t*") if "judge" not in str(p))
    assert "of Acts." not in everything  # judge groups stay out of train and test files

    assert manifest["groups"] == {
        "train": ["Exo", "Gen"],
        "test": ["Mark", "Ruth"],
        "judge": ["Acts"],
    }
    assert manifest["counts"]["pairs/plain-odd.train.jsonl"] == len(train_ids)
    assert manifest["versions"]["plain"]["dropped_short"] == 1
    assert json.loads((out / "manifest.json").read_text())["digest"] == manifest["digest"]


def test_idempotent_and_rewrites_on_change(tmp_path: Path) -> None:
    corpus, out = _corpus(tmp_path / "corpus"), tmp_path / "out"
    first = prepare_aligned(_settings(corpus), out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepare_aligned(_settings(corpus), out) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    assert not list(out.rglob(".*tmp*"))

    changed = prepare_aligned(_settings(corpus, pairs=["old->plain"]), out)
    assert changed["digest"] != first["digest"]
    assert (out / "pairs/old-plain.train.jsonl").is_file()
    assert not (out / "pairs/plain-old.train.jsonl").exists()  # stale files of the last run go


def test_bad_lines_name_file_line_and_field(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    path = corpus / "old.jsonl"
    lines = path.read_text().splitlines()
    cases = {
        '{"id": "Gen.9.9"}': "old.jsonl line 12: missing field 'text'",
        '{"id": "Gen.9.9", "text": 5}': "old.jsonl line 12: field 'text' must be a string",
        '{"text": "x y z"}': "old.jsonl line 12: missing field 'id'",
        '{"id": "Gen", "text": "x y z"}': "old.jsonl line 12: field 'id': 'Gen' is not of the form",
        '{"id": "Gen.1.1", "text": "x y z"}': "old.jsonl line 12: field 'id': duplicate id 'Gen.1.1'",
        "{not json": "old.jsonl line 12: invalid JSON",
        "[1, 2]": "old.jsonl line 12: expected a JSON object",
    }
    for bad, message in cases.items():
        path.write_text("\n".join([*lines[:11], bad, *lines[11:]]) + "\n")
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            prepare_aligned(_settings(corpus), tmp_path / "out")
    path.write_bytes("\n".join(lines[:2]).encode() + b'\n{"id": "Gen.9.9", "text": "\xff"}\n')
    with pytest.raises(DataError, match="old.jsonl line 3: not UTF-8"):
        prepare_aligned(_settings(corpus), tmp_path / "out")


def test_duplicates_policy(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    with (corpus / "old.jsonl").open("a") as f:
        f.write(json.dumps({"id": "Gen.1.1", "text": "a stray second copy"}) + "\n")
    dropped = prepare_aligned(_settings(corpus, duplicates="drop"), tmp_path / "drop")
    assert dropped["duplicate_ids"] == {"old": ["Gen.1.1"]}
    assert dropped["versions"]["old"]["dropped_duplicate"] == 2
    ids = [r["id"] for r in _jsonl(tmp_path / "drop/pairs/plain-old.train.jsonl")]
    assert "Gen.1.1" not in ids
    first = prepare_aligned(_settings(corpus, duplicates="first"), tmp_path / "first")
    rows = {r["id"]: r for r in _jsonl(tmp_path / "first/pairs/plain-old.train.jsonl")}
    assert rows["Gen.1.1"]["target"] == _text("old", "Gen.1.1")
    assert first["versions"]["old"]["dropped_duplicate"] == 1


def test_settings_errors(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    with pytest.raises(ValidationError, match=r"version file not found: .*missing\.jsonl"):
        _settings(corpus, versions=["plain", "missing"], pairs=[])
    with pytest.raises(ValidationError, match="unknown version 'kjv'"):
        _settings(corpus, pairs=["plain->kjv"])
    with pytest.raises(ValidationError, match="expected 'src->tgt'"):
        _settings(corpus, pairs=["plain=>old"])
    with pytest.raises(ValidationError, match="disjoint; both: \\['Ruth'\\]"):
        _settings(corpus, judge_groups=["Ruth"])
    with pytest.raises(ValidationError, match="corpus directory not found"):
        _settings(tmp_path / "nowhere")
    with pytest.raises(ValidationError, match="file stem"):
        _settings(corpus, versions=["plain.jsonl", "old"], pairs=[])
    with pytest.raises(ValidationError, match="at least 2"):
        _settings(corpus, versions=["plain"], pairs=[])
    with pytest.raises(DataError, match=r"test_groups: no version has group\(s\) \['Jonas'\]"):
        prepare_aligned(_settings(corpus, test_groups=["Jonas"]), tmp_path / "out")


def _job():
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import prepare_aligned as job
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    return job


def test_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _job()
    corpus = _corpus(tmp_path / "corpus")
    config = tmp_path / "prepare.yaml"
    good = {
        "dir": str(tmp_path / "elsewhere"),  # overridden by --dir
        "versions": VERSIONS,
        "test_groups": ["Ruth"],
        "judge_groups": ["Acts"],
        "pairs": ["plain->old"],
        "out": str(tmp_path / "out"),
    }
    config.write_text(json.dumps(good))  # JSON is YAML
    assert job.main(["--config", str(config), "--dir", str(corpus)]) == 0
    assert "pairs/plain-old.train.jsonl" in capsys.readouterr().out
    assert (tmp_path / "out/manifest.json").is_file()

    assert job.main(["--config", str(config)]) == 2  # the YAML's dir does not exist
    assert "corpus directory not found" in capsys.readouterr().err
    config.write_text(json.dumps(good | {"pairs": ["plain->kjv"], "dir": str(corpus)}))
    assert job.main(["--config", str(config)]) == 2
    assert "pairs: Value error, pair plain->kjv: unknown version 'kjv'" in capsys.readouterr().err
    config.write_text(json.dumps(good | {"typo": 1}))
    assert job.main(["--config", str(config)]) == 2
    config.write_text(json.dumps(good | {"dir": str(corpus), "test_groups": ["Nowhere"]}))
    assert job.main(["--config", str(config)]) == 1  # bad data: a clear message, no traceback
    assert "test_groups: no version has group(s) ['Nowhere']" in capsys.readouterr().err


def test_bible_config_on_the_real_corpus(tmp_path: Path) -> None:
    if not BIBLE.is_dir():
        pytest.skip(
            f"Bible corpus not found at {BIBLE}: the real-text corpus lives outside the repo"
        )
    job = _job()
    config = job.PrepareAlignedConfig.model_validate(
        __import__("yaml").safe_load((ROOT / "jobs/configs/bible_prepare.yaml").read_text())
    )
    assert Path(config.dir) == Path("../shared/data/bible") and config.out == "runs/bible"
    # the shipped settings, on three versions and one pair to stay fast
    fields = config.model_dump(exclude={"out"}) | {
        "dir": str(BIBLE),
        "versions": ["bbe", "kjv", "ylt"],
        "pairs": ["bbe->kjv"],
    }
    manifest = prepare_aligned(AlignedCorpusSettings.model_validate(fields), tmp_path / "bible")
    counts = manifest["counts"]
    assert manifest["groups"]["test"] == ["James", "Jonah", "Mark", "Ruth", "Titus"]
    assert len(manifest["groups"]["train"]) == 59  # 66 books less 5 test, 2 judge
    assert counts["pairs/bbe-kjv.train.jsonl"] > 25_000 and counts["pairs/bbe-kjv.test.jsonl"] > 900
    assert counts["judge/train.jsonl"] > 5_000
    test = _jsonl(tmp_path / "bible/pairs/bbe-kjv.test.jsonl")
    assert {_group(r["id"]) for r in test} == set(manifest["groups"]["test"])
    train_ids = {r["id"] for r in _jsonl(tmp_path / "bible/pairs/bbe-kjv.train.jsonl")}
    assert not {_group(u) for u in train_ids} & {"Mark", "Ruth", "Jonah", "James", "Titus", "Acts"}
    assert "&lt;" not in (tmp_path / "bible/text/bbe.train.txt").read_text()
