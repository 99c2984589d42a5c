"""Readers, denoising pairs and the synthetic style world (ray_twist.data)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_twist.data import (
    STYLES,
    DataError,
    Task,
    apply_style,
    check_style,
    corrupt,
    denoising_task,
    families,
    make_task,
    make_world,
    neutral_sentences,
    read_paired_text,
    read_task,
    read_texts,
    style_corpus,
    write_task_jsonl,
)
from ray_twist.data.synthetic import FAMILY_RULES

PAIRS = [("you are kind.", "thou art kind."), ("hello, my friend.", "ahoy, me matey.")]


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- readers: round trips


def test_read_task_jsonl_roundtrip_with_references(tmp_path: Path) -> None:
    records = [{"source": s, "target": t, "references": [t.upper()]} for s, t in PAIRS]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    task = read_task(str(path))
    assert task == Task("train", [s for s, _ in PAIRS], [t for _, t in PAIRS])
    assert task.references == [[t.upper()] for _, t in PAIRS]


def test_read_task_csv_tsv_and_custom_columns(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(
        'src,tgt,references\n"a, quoted\nsource",x,"[""r1"", ""r2""]"\nb,y,\n', encoding="utf-8"
    )
    task = read_task(str(csv_path), name="t", source_col="src", target_col="tgt", split="test")
    assert (task.name, task.split) == ("t", "test")
    assert task.pairs == [("a, quoted\nsource", "x"), ("b", "y")]
    assert task.references == [["r1", "r2"], []]

    tsv_path = tmp_path / "data.tsv"
    tsv_path.write_text("source\ttarget\nhello there\tahoy there\n", encoding="utf-8")
    tsv = read_task(str(tsv_path))
    assert tsv.pairs == [("hello there", "ahoy there")] and tsv.references is None


def test_read_task_parquet_and_file_uri(tmp_path: Path) -> None:
    table = pa.table(
        {
            "source": [s for s, _ in PAIRS],
            "target": [t for _, t in PAIRS],
            "references": [["r"], None],
            "extra": [1, 2],
        }
    )
    pq.write_table(table, tmp_path / "style.parquet")
    task = read_task(f"file://{tmp_path}/style.parquet")
    assert task.name == "style" and task.pairs == PAIRS
    assert task.references == [["r"], []]


def test_format_override(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "pairs.data", [{"source": "a", "target": "b"}])
    assert read_task(path, format="jsonl").pairs == [("a", "b")]
    with pytest.raises(DataError, match=r"pairs\.data: cannot infer the format"):
        read_task(path)
    with pytest.raises(ValueError, match="unknown format"):
        read_task(path, format="xml")


def test_read_paired_text_roundtrip(tmp_path: Path) -> None:
    (tmp_path / "train.modern").write_bytes("\ufeffyou are here.\r\nwhere is it?\n".encode())
    (tmp_path / "train.original").write_text("thou art here.\nwhere is ’t?", encoding="utf-8")
    task = read_paired_text(str(tmp_path / "train.modern"), str(tmp_path / "train.original"))
    assert task.name == "train"
    assert task.pairs == [("you are here.", "thou art here."), ("where is it?", "where is ’t?")]


def test_read_texts_all_formats(tmp_path: Path) -> None:
    texts = ["arr, ahoy.", "me matey be here."]
    (tmp_path / "c.txt").write_text("arr, ahoy.\n\n  me matey be here.  \n")
    assert read_texts(str(tmp_path / "c.txt")) == texts
    assert read_texts(_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])) == texts
    (tmp_path / "c.csv").write_text('id,body\n1,"arr, ahoy."\n')
    assert read_texts(str(tmp_path / "c.csv"), column="body") == ["arr, ahoy."]
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    assert read_texts(str(tmp_path / "c.parquet")) == texts


# ---------------------------------------------------------------- readers: errors name the place


GOOD = json.dumps({"source": "a", "target": "b"})


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("train.jsonl", f'{GOOD}\n{{"source": "a"}}\n', "line 2: field 'target' is missing"),
        ("train.jsonl", f'{GOOD}\n\n{{"source": "a",\n', "line 3: invalid JSON at column"),
        ("train.jsonl", "[1, 2]\n", "line 1: expected a JSON object, got list"),
        (
            "train.jsonl",
            f'{GOOD}\n{{"source": 3, "target": "b"}}\n',
            "line 2: field 'source' must be a string, got int",
        ),
        ("train.jsonl", '{"source": " ", "target": "b"}\n', "line 1: field 'source' is empty"),
        (
            "train.jsonl",
            '{"source": "a", "target": "b", "references": "r"}\n',
            "line 1: field 'references' must be a list of strings",
        ),
        ("data.csv", "source,target\na,b\n,b\n", "line 3: column 'source' is empty"),
        (
            "data.csv",
            "source,tgt\na,b\n",
            "line 1: column 'target' is missing (header: source, tgt)",
        ),
        (
            "data.csv",
            'source,target\n"multi\nline",b\na,b,c\n',
            "line 4: 3 fields but the header has 2",
        ),
        (
            "data.csv",
            "source,target,references\na,b,not json\n",
            "line 2: column 'references' must be a JSON list of strings",
        ),
    ],
)
def test_read_task_errors_name_file_line_and_field(
    tmp_path: Path, name: str, content: str, expected: str
) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_task(str(tmp_path / name))
    assert str(err.value).startswith(f"{tmp_path / name} {expected}")


def test_invalid_utf8_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"source": "a", "target": "b"}\n{"source": "\xff", "target": "b"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2: invalid UTF-8 at byte 13"):
        read_task(str(path))


def test_parquet_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"source": ["a"], "tgt": ["b"]}), tmp_path / "data.parquet")
    with pytest.raises(DataError, match=r"data\.parquet: column 'target' is missing"):
        read_task(str(tmp_path / "data.parquet"))
    pq.write_table(pa.table({"source": ["a", None], "target": ["b", "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet row 2: column 'source' is empty"):
        read_task(str(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"source": [1], "target": ["b"]}), tmp_path / "i.parquet")
    with pytest.raises(DataError, match=r"i\.parquet row 1: column 'source' must be a string"):
        read_task(str(tmp_path / "i.parquet"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file"):
        read_task(str(tmp_path / "fake.parquet"))


def test_paired_text_errors(tmp_path: Path) -> None:
    src, tgt = tmp_path / "train.modern", tmp_path / "train.original"
    src.write_text("a\nb\nc\n")
    tgt.write_text("x\ny\n")
    with pytest.raises(DataError, match=r"train\.modern has 3 lines but .*train\.original has 2"):
        read_paired_text(str(src), str(tgt))
    tgt.write_text("x\n  \nz\n")
    with pytest.raises(DataError, match=r"train\.original line 2: blank line"):
        read_paired_text(str(src), str(tgt))
    tgt.write_bytes(b"x\ny\nz\xc3\n")
    with pytest.raises(DataError, match=r"train\.original line 3: invalid UTF-8 at byte 2"):
        read_paired_text(str(src), str(tgt))


def test_read_texts_errors(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(DataError, match=r"c\.jsonl line 2: field 'text' is missing"):
        read_texts(path)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"empty\.txt: no texts"):
        read_texts(str(tmp_path / "empty.txt"))


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- denoising


def test_denoising_is_deterministic_and_corrupts() -> None:
    texts = neutral_sentences(100, seed=3)
    task = denoising_task(texts, "pirate-mono", seed=7)
    assert task.targets == texts and task.name == "pirate-mono"
    assert task == denoising_task(texts, "pirate-mono", seed=7)
    assert task.sources != denoising_task(texts, "pirate-mono", seed=8).sources
    changed = sum(s != t for s, t in task.pairs)
    assert changed >= 80, changed
    assert any("[MASK]" in s for s in task.sources)
    assert all(s.strip() for s in task.sources)


def test_corrupt_components() -> None:
    words = [f"w{i}" for i in range(30)]
    text = " ".join(words)
    rng = random.Random(0)
    for window in (0, 1, 3):
        out = corrupt(text, rng, dropout=0.0, shuffle_window=window, mask_prob=0.0).split()
        assert sorted(out) == sorted(words)
        assert all(abs(out.index(w) - i) <= window for i, w in enumerate(words))
    assert corrupt(text, rng, dropout=0.0, shuffle_window=0, mask_prob=0.0) == text
    assert set(corrupt(text, rng, dropout=0.0, mask_prob=1.0, mask_token="<m>").split()) == {"<m>"}
    for _ in range(50):
        assert corrupt("one two", rng, dropout=0.99, mask_prob=0.0) in {"one", "two", "one two"}
        assert corrupt("one two", rng, dropout=0.99, mask_prob=0.0)
    with pytest.raises(ValueError, match="dropout"):
        corrupt(text, rng, dropout=1.0)


# ---------------------------------------------------------------- synthetic style world


def test_world_has_enough_styles_and_families() -> None:
    fams = families()
    assert len(STYLES) >= 8 and len(fams) >= 3
    assert all(len(members) >= 2 for members in fams.values())
    assert sorted(s for members in fams.values() for s in members) == sorted(STYLES)
    # families use disjoint rewriting rules: no word rewritten or produced by two families
    for a in FAMILY_RULES:
        for b in FAMILY_RULES:
            if a != b:
                words_b = set(FAMILY_RULES[b]) | set(FAMILY_RULES[b].values())
                assert not set(FAMILY_RULES[a]) & words_b, (a, b)


def test_neutral_sentences_deterministic_distinct_and_sized() -> None:
    first = neutral_sentences(300, seed=0)
    assert first == neutral_sentences(300, seed=0)
    assert first != neutral_sentences(300, seed=1)
    assert len(set(first)) == 300
    assert all(6 <= len(s.split()) <= 14 and s == s.lower() for s in first)


def test_world_deterministic_per_seed() -> None:
    world = make_world(20, seed=0)
    assert set(world) == set(STYLES)
    assert world == make_world(20, seed=0)
    other = make_world(20, seed=1)
    assert all(world[s].sources != other[s].sources for s in STYLES)
    assert make_world(5, styles=["pirate", "sailor"]).keys() == {"pirate", "sailor"}


def test_siblings_share_rules_and_differ_by_marker() -> None:
    sentence = "hello, you want to buy my old boat before dinner."
    assert (
        apply_style("pirate", sentence) == "arr, ahoy, you want to buy me old boat before dinner."
    )
    assert (
        apply_style("sailor", sentence) == "ahoy, you want to buy me old boat before dinner, aye."
    )
    assert apply_style("shouty", sentence).endswith("ancient boat before dinner!")
    assert apply_style("shakespearean", sentence).startswith("hello, thou want")


def test_checkers_accept_own_and_reject_neutral_and_others() -> None:
    sentences = neutral_sentences(200, seed=5)
    outputs = {s: [apply_style(s, x) for x in sentences] for s in STYLES}
    for style in STYLES:
        assert sum(check_style(style, y) for y in outputs[style]) >= 0.95 * len(sentences)
        assert not any(check_style(style, x) for x in sentences), style
        for other in STYLES:
            if other != style:
                assert not any(check_style(style, y) for y in outputs[other]), (style, other)


def test_checker_tolerates_tokenizer_spacing_but_not_half_done_rewrites() -> None:
    styled = apply_style("pirate", "my friend is happy.")
    assert styled == "arr, me matey be happy."
    assert check_style("pirate", "ARR , me matey be happy .")
    assert not check_style("pirate", "arr, my friend is happy.")  # marker without the rules
    assert not check_style("pirate", "arr, me matey be happy, aye.")  # sibling's marker too


def test_make_task_and_style_corpus() -> None:
    task = make_task("biblical", 30, seed=2, split="test")
    assert (task.name, task.split, len(task)) == ("biblical", "test", 30)
    assert task.targets == [apply_style("biblical", s) for s in task.sources]
    corpus = style_corpus(10, seed=0)
    labels = [label for _, label in corpus]
    assert sorted(set(labels)) == sorted([*STYLES, "neutral"])
    assert all(labels.count(lab) == 10 for lab in set(labels))
    assert corpus == style_corpus(10, seed=0)
    world_targets = {t for task in make_world(10, seed=0).values() for t in task.targets}
    assert not world_targets & {text for text, _ in corpus}


def test_unknown_style_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown style 'ninja'.*pirate"):
        make_task("ninja", 3)
    with pytest.raises(ValueError, match="known styles"):
        check_style("ninja", "x")


def test_write_task_jsonl_roundtrips_through_reader(tmp_path: Path) -> None:
    task = make_task("formal", 12, seed=4)
    uri = write_task_jsonl(task, tmp_path / "sub" / "formal.jsonl")
    assert read_task(uri) == task
    with_refs = Task("r", ["a"], ["b"], references=[["b1", "b2"]])
    assert read_task(write_task_jsonl(with_refs, tmp_path / "r.jsonl")).references == [["b1", "b2"]]
