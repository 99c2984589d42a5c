"""Restyle input: any supported file or directory → normalized rows {id, text, reason}.

Input (a file or a directory; local path, file://, s3://, gs://), by suffix or `input_format`:
    parquet   a text column (`text_column`) and optionally an id column (`id_column`)
    jsonl     one JSON object per line, same columns; blank lines are not records
    text      one line = one row (any other suffix; directories: their *.txt files)
Row ids: the id column's value as a string when there is one; otherwise the first 16 hex
digits of the SHA-256 of the text (UTF-8), so ids survive re-reads, re-splits and reorders.
Identical texts without an id column therefore share an id (and, decoded greedily, an output).
A row whose `reason` is set is not restyled: it goes to the errors output with that reason.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs

from ray_twist import storage

InputFormat = Literal["parquet", "jsonl", "text"]
_SUFFIXES: dict[str, InputFormat] = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
_EXTENSIONS: dict[InputFormat, list[str]] = {
    "parquet": ["parquet"],
    "jsonl": ["jsonl", "json"],
    "text": ["txt"],
}
_ROW_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("reason", pa.string())])


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


def _line_rows(file_row: dict[str, Any], fmt: InputFormat, text_column: str, id_column: str):
    """One file's bytes → its records, one per line (decoded line by line, so one bad
    line is one error row rather than a failed read)."""
    out = []
    for line in file_row["bytes"].splitlines():
        if fmt == "text":
            out.append(_record(None, line))
            continue
        if not line.strip():
            continue
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError:
            out.append(_record(None, line))  # records why
            continue
        try:
            obj = json.loads(decoded)
        except json.JSONDecodeError as exc:
            out.append(_record(None, decoded, f"invalid JSON line: {exc}"))
            continue
        if isinstance(obj, dict):
            out.append(_record(obj.get(id_column), obj.get(text_column)))
        else:
            reason = f"JSON line is a {type(obj).__name__}, not an object"
            out.append(_record(None, decoded, reason))
    return out


def _parquet_rows(batch: pa.Table, text_column: str, id_column: str) -> pa.Table:
    texts = batch.column(text_column).to_pylist()
    if id_column in batch.column_names:
        ids = batch.column(id_column).to_pylist()
    else:
        ids = [None] * len(texts)
    rows = [_record(i, t) for i, t in zip(ids, texts, strict=True)]
    return pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)


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


def read_rows(
    input_uri: str, fmt: InputFormat, text_column: str = "text", id_column: str = "id"
) -> Any:
    """A Ray Dataset of normalized rows {id, text, reason} from any supported input."""
    import ray.data

    fs, path = storage.resolve(input_uri)
    is_dir = fs.get_file_info(path).type == pafs.FileType.Directory
    extensions = _EXTENSIONS[fmt] if is_dir else None
    if fmt == "parquet":
        ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=extensions)
        names = ds.schema().names
        if text_column not in names:
            raise ValueError(f"{input_uri}: no column {text_column!r} (columns: {names})")
        ds = ds.select_columns([c for c in names if c in (text_column, id_column)])
        rows = partial(_parquet_rows, text_column=text_column, id_column=id_column)
        return ds.map_batches(rows, batch_format="pyarrow")
    ds = ray.data.read_binary_files(path, filesystem=fs, file_extensions=extensions)
    return ds.flat_map(partial(_line_rows, fmt=fmt, text_column=text_column, id_column=id_column))
