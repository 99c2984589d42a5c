"""A verse-aligned multi-version corpus → text, pair and style-judge files, split by group.

Input: one JSON Lines file per version, `<dir>/<version>.jsonl`, one record per line with an
id field and a text field. Records with the same id in two files are the same unit (a Bible
verse) in two styles. Ids look like `Group.rest` (`Mark.1.1`): the split is by group (the
book), so test units share no group — hence no chapter — with training units.

`prepare_aligned(settings, out)` writes, under the local directory `out`:

    text/<version>.train.txt        train-group texts, one per line (base model, denoising)
    text/<version>.test.txt         test-group texts (held-out lines, e.g. copy-BLEU)
    text/all.train.txt              every version's train texts, de-duplicated, shuffled (seed)
    pairs/<src>-<tgt>.train.jsonl   {"id", "source", "target"}: ids in both versions, train
    pairs/<src>-<tgt>.test.jsonl    the same for the test groups (source-file order)
    judge/train.jsonl               {"id", "text", "label"}: judge groups, every version
    judge/test.jsonl                the same for the test groups (judge accuracy only)
    manifest.json                   settings, input sha256s, digest, counts per file, seconds

Judge groups are in neither the train nor the test files. Whitespace inside a text (newlines
included) collapses to single spaces; texts of fewer than `min_words` words are dropped (per
version, so a pair needs both sides kept). Every file is written to a temp file and renamed;
the manifest goes last, and a rerun whose settings and inputs have the same digest returns
the existing manifest without rewriting anything. Reading uses only the standard library:
a bad line raises `DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import random
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from ray_twist.data.readers import DataError, jsonl_objects
from ray_twist.settings import Settings, json_digest

__all__ = [
    "AlignedCorpusSettings",
    "PrepareAlignedConfig",
    "prepare_aligned",
    "read_aligned_version",
]

FORMAT_VERSION = 1  # part of the digest: bump when the output layout or content changes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = {"all"}  # text/all.train.txt is the union


class AlignedCorpusSettings(Settings):
    """Which version files to read, how to split them by group, which pairs to write."""

    check_files: ClassVar[bool] = True  # PrepareAlignedConfig defers it until --dir is applied

    dir: str = Field(description="directory holding <version>.jsonl files (relative: to the cwd)")
    versions: list[str] = Field(min_length=2, description="file stems, e.g. [bbe, kjv]")
    id_field: str = "id"
    text_field: str = "text"
    test_groups: list[str] = Field(min_length=1, description="groups (id prefixes) held out")
    judge_groups: list[str] = Field(
        min_length=1, description="groups for style-judge training only (not train, not test)"
    )
    pairs: list[tuple[str, str]] = Field(
        default_factory=list, description='ordered version pairs: ["src->tgt", ...] or [[src, tgt]]'
    )
    min_words: int = Field(default=3, ge=0, description="drop texts with fewer words")
    duplicates: Literal["error", "drop", "first"] = Field(
        default="error",
        description="an id twice in one file: error, drop every copy, or keep the first",
    )
    unescape_html: bool = Field(default=False, description="&lt; → <, &amp; → & … in texts")
    seed: int = Field(default=0, description="shuffle of text/all.train.txt and judge files")

    @field_validator("versions")
    @classmethod
    def _versions(cls, value: list[str], info: ValidationInfo) -> list[str]:
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"versions must be unique; repeated: {repeated}")
        for v in value:
            if not _NAME.match(v) or v.endswith(".jsonl"):
                raise ValueError(f"version {v!r}: give the file stem (bbe for bbe.jsonl)")
            if v in _RESERVED:
                raise ValueError(f"version name {v!r} is reserved (text/{v}.train.txt)")
        directory = info.data.get("dir")
        if cls.check_files and directory is not None:
            base = Path(directory)
            if not base.is_dir():
                raise ValueError(f"corpus directory not found: {base}")
            missing = [
                str(base / f"{v}.jsonl") for v in value if not (base / f"{v}.jsonl").is_file()
            ]
            if missing:
                raise ValueError(f"version file not found: {', '.join(missing)}")
        return value

    @field_validator("test_groups", "judge_groups")
    @classmethod
    def _groups(cls, value: list[str], info: ValidationInfo) -> list[str]:
        repeated = sorted({g for g in value if value.count(g) > 1})
        if repeated:
            raise ValueError(f"groups must be unique; repeated: {repeated}")
        if info.field_name == "judge_groups":
            both = sorted(set(value) & set(info.data.get("test_groups") or []))
            if both:
                raise ValueError(f"judge_groups and test_groups must be disjoint; both: {both}")
        return value

    @field_validator("pairs", mode="before")
    @classmethod
    def _arrow_strings(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        parsed = []
        for item in value:
            if isinstance(item, str):
                parts = [p.strip() for p in item.split("->")]
                if len(parts) != 2 or not all(parts):
                    raise ValueError(f"pair {item!r}: expected 'src->tgt'")
                item = tuple(parts)
            parsed.append(item)
        return parsed

    @field_validator("pairs")
    @classmethod
    def _known_pairs(cls, value: list[tuple[str, str]], info: ValidationInfo) -> list:
        versions = info.data.get("versions")
        for src, tgt in value:
            if src == tgt:
                raise ValueError(f"pair {src}->{tgt}: source and target are the same version")
            unknown = [v for v in (src, tgt) if versions is not None and v not in versions]
            if unknown:
                raise ValueError(
                    f"pair {src}->{tgt}: unknown version {unknown[0]!r}; "
                    f"versions: {', '.join(versions or [])}"
                )
        repeated = sorted({f"{s}->{t}" for s, t in value if value.count((s, t)) > 1})
        if repeated:
            raise ValueError(f"pairs must be unique; repeated: {repeated}")
        return value

    def version_path(self, version: str) -> Path:
        return Path(self.dir) / f"{version}.jsonl"


class PrepareAlignedConfig(AlignedCorpusSettings):
    """jobs/prepare_aligned.py: the corpus settings plus `out`. The version files are checked
    when the job re-validates as `AlignedCorpusSettings`, after `--dir` is applied."""

    check_files: ClassVar[bool] = False

    out: str = Field(description="output directory (local)")


# ---------------------------------------------------------------- reading


def read_aligned_version(
    path: str | Path,
    id_field: str = "id",
    text_field: str = "text",
    duplicates: Literal["error", "drop", "first"] = "error",
) -> tuple[list[tuple[str, str]], str, dict[str, int]]:
    """(id, text) records of one version file in file order, its sha256, and each repeated
    id with its number of copies.

    Blank lines are skipped; anything else that is not a JSON object with a string id (of the
    form `Group.rest`) and a string text raises `DataError` as `file:line: problem`. An id
    seen twice is an error, or (`duplicates`) every copy is dropped, or the first is kept.
    """
    path = Path(path)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path} line {bad_line}: not UTF-8 ({exc.reason})") from exc
    records: list[tuple[str, str]] = []
    first_line: dict[str, str] = {}
    repeated: dict[str, int] = {}
    for where, row in jsonl_objects(content.split("\n"), str(path)):
        values = []
        for field in (id_field, text_field):
            if field not in row:
                raise DataError(f"{where}: missing field {field!r}")
            if not isinstance(row[field], str):
                raise DataError(
                    f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}"
                )
            values.append(row[field])
        uid, text = values
        group, dot, rest = uid.partition(".")
        if not (group and dot and rest):
            raise DataError(f"{where}: field {id_field!r}: {uid!r} is not of the form Group.rest")
        if uid in first_line:
            if duplicates == "error":
                raise DataError(
                    f"{where}: field {id_field!r}: duplicate id {uid!r} "
                    f"(first at {first_line[uid]}; set duplicates: drop or first)"
                )
            repeated[uid] = repeated.get(uid, 1) + 1
            continue
        first_line[uid] = where
        records.append((uid, text))
    if repeated and duplicates == "drop":
        records = [(uid, text) for uid, text in records if uid not in repeated]
    return records, digest, repeated


def _group(uid: str) -> str:
    return uid.partition(".")[0]


def _clean(text: str) -> str:
    """All whitespace runs (newlines, tabs, U+2028 …) → one space, so one text = one line."""
    return " ".join(text.split())


# ---------------------------------------------------------------- writing


def _write_atomic(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _lines(texts: Iterable[str]) -> str:
    return "".join(f"{t}\n" for t in texts)


def _jsonl(rows: Iterable[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _digest(settings: AlignedCorpusSettings, inputs: dict[str, str]) -> str:
    """Settings (less `dir`: moving the corpus changes nothing) + input sha256s + format."""
    payload = {
        "format": FORMAT_VERSION,
        "settings": settings.model_dump(mode="json", exclude={"dir"}),
        "inputs": inputs,
    }
    return json_digest(payload)


def _existing(out: Path, digest: str) -> dict[str, Any] | None:
    """The manifest under `out` if it has this digest and every file it lists is there."""
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("digest") != digest:
        return None
    if not all((out / name).is_file() for name in manifest.get("counts", {})):
        return None
    return manifest


def prepare_aligned(settings: AlignedCorpusSettings, out: str | Path) -> dict[str, Any]:
    """Write the text, pair and judge files under `out` (see the module doc); the manifest.

    Idempotent: with the same settings digest (settings + input file contents) an existing
    `out/manifest.json` is returned and nothing is rewritten. Raises `DataError` for bad input
    lines and for test or judge groups that no version contains.
    """
    start = time.perf_counter()
    # re-validated: a PrepareAlignedConfig or a model_copy has not had its files checked
    settings = AlignedCorpusSettings.model_validate(
        settings.model_dump(include=set(AlignedCorpusSettings.model_fields))
    )
    out = Path(out)
    versions = settings.versions

    data: dict[str, list[tuple[str, str]]] = {}
    inputs: dict[str, str] = {}
    stats: dict[str, dict[str, int]] = {}
    duplicate_ids: dict[str, list[str]] = {}
    for v in versions:
        records, sha, repeated = read_aligned_version(
            settings.version_path(v), settings.id_field, settings.text_field, settings.duplicates
        )
        inputs[f"{v}.jsonl"] = sha
        if repeated:
            duplicate_ids[v] = list(repeated)
        extra = sum(repeated.values()) - len(repeated)  # copies after the first
        dropped = extra + len(repeated) * (settings.duplicates == "drop")
        kept, short = [], 0
        for uid, text in records:
            text = _clean(html.unescape(text) if settings.unescape_html else text)
            if not text or len(text.split()) < settings.min_words:
                short += 1
                continue
            kept.append((uid, text))
        data[v] = kept
        stats[v] = {
            "records": len(records) + dropped,
            "kept": len(kept),
            "dropped_short": short,
            "dropped_duplicate": dropped,
        }

    digest = _digest(settings, inputs)
    existing = _existing(out, digest)
    if existing is not None:
        return existing

    present = {_group(uid) for rows in data.values() for uid, _ in rows}
    for key in ("test_groups", "judge_groups"):
        absent = [g for g in getattr(settings, key) if g not in present]
        if absent:
            shown = ", ".join(sorted(present)[:12]) + (", …" if len(present) > 12 else "")
            raise DataError(f"{key}: no version has group(s) {absent}; groups present: {shown}")
    test, judge = set(settings.test_groups), set(settings.judge_groups)

    def split(uid: str) -> str:
        group = _group(uid)
        return "test" if group in test else "judge" if group in judge else "train"

    files: dict[str, str] = {}
    by_split: dict[str, dict[str, list[tuple[str, str]]]] = {
        s: {v: [(u, t) for u, t in data[v] if split(u) == s] for v in versions}
        for s in ("train", "test", "judge")
    }
    rng = random.Random(settings.seed)
    union = list(dict.fromkeys(t for v in versions for _, t in by_split["train"][v]))
    rng.shuffle(union)
    files["text/all.train.txt"] = _lines(union)
    for v in versions:
        files[f"text/{v}.train.txt"] = _lines(t for _, t in by_split["train"][v])
        files[f"text/{v}.test.txt"] = _lines(t for _, t in by_split["test"][v])
    for src, tgt in settings.pairs:
        for s in ("train", "test"):
            target = dict(by_split[s][tgt])
            rows = [
                {"id": u, "source": t, "target": target[u]}
                for u, t in by_split[s][src]
                if u in target
            ]
            files[f"pairs/{src}-{tgt}.{s}.jsonl"] = _jsonl(rows)
    for name, s in (("train", "judge"), ("test", "test")):
        rows = [{"id": u, "text": t, "label": v} for v in versions for u, t in by_split[s][v]]
        rng.shuffle(rows)
        files[f"judge/{name}.jsonl"] = _jsonl(rows)

    previous = out / "manifest.json"
    stale: list[str] = []
    if previous.is_file():  # files of an earlier run that this one does not write
        try:
            stale = [
                n for n in json.loads(previous.read_text()).get("counts", {}) if n not in files
            ]
        except (OSError, ValueError, AttributeError):
            stale = []
        previous.unlink()  # no manifest while files change: an interrupted run reruns in full
    for name, text in files.items():
        _write_atomic(out / name, text)
    for name in stale:
        (out / name).unlink(missing_ok=True)

    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "digest": digest,
        "settings": settings.model_dump(mode="json"),
        "inputs": inputs,
        "versions": stats,
        "duplicate_ids": duplicate_ids,
        "groups": {
            "train": sorted(present - test - judge),
            "test": sorted(test),
            "judge": sorted(judge),
        },
        "counts": {name: text.count("\n") for name, text in files.items()},
        "seconds": round(time.perf_counter() - start, 3),
    }
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest
