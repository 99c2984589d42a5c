"""Restyle input: any supported file or directory → normalized rows {id, text, reason}
and where each came from (file, line), read by many tasks (`ray_twist.data.ranges`).

Input (a file or a directory; local path, file://, s3://, gs://), by suffix or `input_format`:
    parquet   a text column (`text_column`) and optionally an id column (`id_column`)
    jsonl     one JSON object per line, same columns; blank lines are not records
    text      one line = one row (any other suffix; directories: their *.txt files)
Row ids: the id column's value as a string when there is one; otherwise the first 16 hex
digits of the SHA-256 of the text (UTF-8), so ids survive re-reads, re-splits and reorders.
Identical texts without an id column therefore share an id (and, decoded greedily, an output).
A row whose `reason` is set is not restyled: it goes to the errors output with that reason,
its file and its line (JSONL, text; the row, for Parquet).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_twist import storage
from ray_twist.data.ranges import Intervals, RangeDatasource, line_ranges, parquet_ranges

InputFormat = Literal["parquet", "jsonl", "text"]
_SUFFIXES: dict[str, InputFormat] = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
_EXTENSIONS: dict[InputFormat, list[str]] = {
    "parquet": ["parquet"],
    "jsonl": ["jsonl", "json"],
    "text": ["txt"],
}
_WHERE = ("file", "line", "range", "seq")
#: Normalized input rows: id, text, reason, and where the row came from (file, its 1-based
#: line — row for Parquet —, the read range and the row's index among the range's rows).
ROW_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("reason", pa.string()), ("file", pa.string()),
     ("line", pa.int64()), ("range", pa.int64()), ("seq", pa.int64())]
)  # fmt: skip


def text_id(text: str) -> str:
    """Id of a row without an id column: SHA-256 of its UTF-8 text, 16 hex digits."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _record(id_value: Any, text: Any, reason: str | None = None) -> dict[str, Any]:
    """A normalized input row {id, text, reason}; `reason` set means it is not restyled."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = reason or f"undecodable: not UTF-8 at byte {exc.start}"
            text = text.decode("utf-8", "replace")
    if reason is None:
        if text is None:
            reason = "missing text (null)"
        elif not isinstance(text, str):
            reason, text = f"text is a {type(text).__name__}, not a string", json.dumps(text)
        elif not text.strip():
            reason = "empty text"
    key = str(id_value) if id_value is not None else text_id(text or "")
    return {"id": key, "text": text, "reason": reason}


def _parse_line(line: bytes, fmt: InputFormat, text_column: str, id_column: str) -> dict | None:
    """One line → its record (None: a blank JSONL line, no record); decoded line by line,
    so one bad line is one error row rather than a failed read."""
    if fmt == "text":
        return _record(None, line)
    if not line.strip():
        return None
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return _record(None, line)  # records why
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return _record(None, decoded, f"invalid JSON line: {exc}")
    if isinstance(obj, dict):
        return _record(obj.get(id_column), obj.get(text_column))
    return _record(None, decoded, f"JSON line is a {type(obj).__name__}, not an object")


def _normalize(batch: pa.Table, fmt: InputFormat, text_column: str, id_column: str) -> pa.Table:
    """Rows of `RangeDatasource` (file, line, range, seq, and a line's bytes or the Parquet
    columns) → normalized rows, keeping where each came from."""
    where = {c: batch.column(c).to_pylist() for c in _WHERE}
    if fmt == "parquet":
        texts = batch.column(text_column).to_pylist()
        names = batch.column_names
        ids = batch.column(id_column).to_pylist() if id_column in names else [None] * len(texts)
        records: list[dict | None] = [_record(i, t) for i, t in zip(ids, texts, strict=True)]
    else:
        data = batch.column("data").to_pylist()
        records = [_parse_line(line, fmt, text_column, id_column) for line in data]
    rows = [
        {**record, **{c: where[c][k] for c in _WHERE}}
        for k, record in enumerate(records)
        if record is not None
    ]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def detect_input_format(input_uri: str, given: str | None = None) -> InputFormat:
    """The input's format: `given`, or from the file suffix (or the files in a directory)."""
    if given is not None:
        if given not in _EXTENSIONS:
            raise ValueError(f"input_format must be one of {sorted(_EXTENSIONS)}; got {given!r}")
        return given  # type: ignore[return-value]
    fs, path = storage.resolve(input_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"restyle input {input_uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return _SUFFIXES.get(Path(path).suffix.lower(), "text")
    files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    found = {_SUFFIXES.get(Path(f.path).suffix.lower(), "text") for f in files if f.is_file}
    known = found & {"parquet", "jsonl"}
    if len(known) > 1:
        raise ValueError(f"{input_uri}: mixes {sorted(known)} files; pass input_format")
    return known.pop() if known else "text"


def _files(fs: pafs.FileSystem, path: str, fmt: InputFormat) -> list[str]:
    """The input's files: the file itself, or a directory's files of the format, sorted."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return [path]
    suffixes = tuple(f".{e}" for e in _EXTENSIONS[fmt])
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        f.path
        for f in found
        if f.is_file and f.base_name.lower().endswith(suffixes) and f.base_name[0] not in "._"
    )


def read_rows(
    input_uri: str,
    fmt: InputFormat,
    text_column: str = "text",
    id_column: str = "id",
    skip: Mapping[str, Intervals] | None = None,
    range_bytes: int | None = None,
) -> Any:
    """A Ray Dataset of normalized rows {id, text, reason, file, line, range, seq} from any
    supported input, read in parallel ranges (`ray_twist.data.ranges`: a large file is many
    read tasks, `range_bytes` each for lines); `skip` leaves out lines already done."""
    import ray.data

    fs, path = storage.resolve(input_uri)
    files = _files(fs, path, fmt)
    if not files:
        raise FileNotFoundError(f"{input_uri}: no {fmt} files")
    if fmt == "parquet":
        for file in files:
            with fs.open_input_file(file) as f:
                names = pq.ParquetFile(f).schema_arrow.names
            if text_column not in names:
                raise ValueError(f"{file}: no column {text_column!r} (columns: {names})")
        ranges = parquet_ranges(fs, files)
        source = RangeDatasource(fs, ranges, "parquet", [text_column, id_column], skip)
    else:
        source = RangeDatasource(fs, line_ranges(fs, files, range_bytes), "lines", skip=skip)
    rows = partial(_normalize, fmt=fmt, text_column=text_column, id_column=id_column)
    return ray.data.read_datasource(source).map_batches(rows, batch_format="pyarrow")
