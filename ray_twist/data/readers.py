"""Readers for task corpora: JSON Lines, CSV/TSV, Parquet, paired text files, plain text.

Every reader goes through `ray_twist.storage`, so local paths, file://, s3:// and gs://
behave the same. Bad input raises `DataError` naming the file and the line (or Parquet
row) and the field, because a pool build that stops on example 40 312 of a corpus has to
say where to look.

Formats are inferred from the extension (`.jsonl`/`.ndjson`/`.json` = JSON Lines,
`.csv`, `.tsv`, `.parquet`/`.pq`, `.txt` = one text per line) or given as `format=`.
An optional `references` column holds extra reference rewrites per example: a list of
strings in JSON Lines and Parquet, a JSON-encoded list of strings in a CSV/TSV cell.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_twist import storage
from ray_twist.data.denoise import denoising_task
from ray_twist.data.task import Task

REFERENCES = "references"
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
}
TABLE_FORMATS = ("jsonl", "csv", "tsv", "parquet")


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, line and field."""


def read_task(
    uri: str,
    name: str | None = None,
    format: str | None = None,
    source_col: str = "source",
    target_col: str = "target",
    split: str = "train",
) -> Task:
    """A parallel task from a JSON Lines, CSV/TSV or Parquet file; name defaults to the stem."""
    fmt = _format(uri, format, TABLE_FORMATS)
    kind = "field" if fmt == "jsonl" else "column"
    sources: list[str] = []
    targets: list[str] = []
    references: list[list[str] | None] = []
    for where, row in _rows(uri, fmt, [source_col, target_col], optional=[REFERENCES]):
        sources.append(_string(where, kind, source_col, row))
        targets.append(_string(where, kind, target_col, row))
        references.append(_references(where, kind, row, encoded=fmt in ("csv", "tsv")))
    if not sources:
        raise DataError(f"{_shown(uri)}: no examples")
    has_refs = any(r is not None for r in references)
    return Task(
        name=name or _stem(uri),
        sources=sources,
        targets=targets,
        split=split,
        references=[r or [] for r in references] if has_refs else None,
    )


def read_paired_text(
    source_uri: str, target_uri: str, name: str | None = None, split: str = "train"
) -> Task:
    """A parallel task from two line-aligned files (e.g. train.modern + train.original)."""
    sources = _sentence_lines(source_uri)
    targets = _sentence_lines(target_uri)
    if len(sources) != len(targets):
        raise DataError(
            f"{_shown(source_uri)} has {len(sources)} lines "
            f"but {_shown(target_uri)} has {len(targets)}"
        )
    return Task(name=name or _stem(source_uri), sources=sources, targets=targets, split=split)


def read_texts(uri: str, column: str = "text", format: str | None = None) -> list[str]:
    """Target-only (non-parallel) texts: `.txt` one per line (blank lines skipped), or
    `column` of a JSON Lines/CSV/TSV/Parquet file."""
    fmt = _format(uri, format, ("text", *TABLE_FORMATS))
    if fmt == "text":
        texts = [line.strip() for line in _lines(uri) if line.strip()]
    else:
        kind = "field" if fmt == "jsonl" else "column"
        texts = [_string(where, kind, column, row) for where, row in _rows(uri, fmt, [column])]
    if not texts:
        raise DataError(f"{_shown(uri)}: no texts")
    return texts


def read_corpus(uri: str, name: str | None = None, seed: int = 0) -> Task:
    """A style task from parallel data, or from `.txt` style text as denoising pairs."""
    if _format(uri, None, ("text", *TABLE_FORMATS)) == "text":
        return denoising_task(read_texts(uri), name=name or _stem(uri), seed=seed)
    return read_task(uri, name=name)


def read_records(
    uri: str, required: Sequence[str], optional: Sequence[str] = (), format: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each row of a JSON Lines/CSV/TSV/Parquet table; `where` names the
    file and line (or row) for error messages."""
    return _rows(uri, _format(uri, format, TABLE_FORMATS), required, optional)


def _shown(uri: str) -> str:
    """The URI as errors show it: without a query string, which may carry credentials."""
    return str(uri).split("?", 1)[0]


def _stem(uri: str) -> str:
    return PurePosixPath(_shown(uri).rstrip("/")).name.split(".", 1)[0]


def _format(uri: str, format: str | None, allowed: tuple[str, ...]) -> str:
    if format is not None:
        if format not in allowed:
            raise ValueError(f"unknown format {format!r}; expected one of {', '.join(allowed)}")
        return format
    fmt = _EXTENSIONS.get(PurePosixPath(_shown(uri)).suffix.lower())
    if fmt not in allowed:
        raise DataError(
            f"{_shown(uri)}: cannot infer the format from the extension; "
            f"pass format= one of {', '.join(allowed)}"
        )
    return fmt


def _lines(uri: str) -> list[str]:
    """Decoded lines without terminators; bad UTF-8 is reported with its line and byte."""
    data = storage.read_bytes(uri)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{_shown(uri)} line {line}: invalid UTF-8 at byte {err.start - line_start + 1}"
        ) from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _sentence_lines(uri: str) -> list[str]:
    lines = _lines(uri)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError(f"{_shown(uri)} line {number}: blank line")
    if not lines:
        raise DataError(f"{_shown(uri)}: no lines")
    return [line.strip() for line in lines]


def _rows(
    uri: str, fmt: str, columns: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) pairs; `where` is "FILE line N" (or "FILE row N" for Parquet)."""
    if fmt == "jsonl":
        return _jsonl_rows(uri)
    if fmt == "parquet":
        return _parquet_rows(uri, columns, optional)
    return _csv_rows(uri, columns, "\t" if fmt == "tsv" else ",")


def _jsonl_rows(uri: str) -> Iterator[tuple[str, dict[str, Any]]]:
    return jsonl_objects(_lines(uri), _shown(uri))


def jsonl_objects(lines: Iterable[str], shown: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(\"FILE line N\", object) for each non-blank JSON Lines line; bad lines raise DataError."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{shown} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON at column {err.colno}: {err.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _csv_rows(
    uri: str, columns: Sequence[str], delimiter: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    text = "\n".join(_lines(uri))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{_shown(uri)}: empty file, expected a header line")
        for column in columns:
            if column not in header:
                raise DataError(
                    f"{_shown(uri)} line 1: column {column!r} is missing "
                    f"(header: {', '.join(header)})"
                )
        start = reader.line_num + 1
        for row in reader:
            where = f"{_shown(uri)} line {start}"
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields but the header has {len(header)}")
            yield where, dict(zip(header, row, strict=True))
    except csv.Error as err:
        raise DataError(f"{_shown(uri)} line {reader.line_num}: {err}") from None


def _parquet_rows(
    uri: str, columns: Sequence[str], optional: Sequence[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{_shown(uri)}: not a readable Parquet file ({err})") from None
        names = parquet.schema_arrow.names
        for column in columns:
            if column not in names:
                raise DataError(
                    f"{_shown(uri)}: column {column!r} is missing (columns: {', '.join(names)})"
                )
        wanted = [*columns, *(c for c in optional if c in names and c not in columns)]
        table = parquet.read(columns=wanted)
    for number, record in enumerate(table.to_pylist(), 1):
        yield f"{_shown(uri)} row {number}", record


def _string(where: str, kind: str, name: str, row: dict[str, Any]) -> str:
    if name not in row:
        raise DataError(f"{where}: {kind} {name!r} is missing")
    value = row[name]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {kind} {name!r} must be a string, got {type(value).__name__}")
    if value is None or not value.strip():
        raise DataError(f"{where}: {kind} {name!r} is empty")
    return value


def _references(where: str, kind: str, row: dict[str, Any], encoded: bool) -> list[str] | None:
    """The row's reference rewrites; None when the row has no references field at all."""
    if REFERENCES not in row:
        return None
    value = row[REFERENCES]
    if encoded:
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: {kind} {REFERENCES!r} must be a JSON list of strings"
            ) from None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: {kind} {REFERENCES!r} must be a list of strings")
    return value
