"""Bulk restyling of a corpus with Ray Data: resumable, bad rows set aside, one model per actor.

Input (a file or a directory; local path, file://, s3://, gs://), by suffix or `input_format`:
    parquet   a text column (`text_column`) and optionally an id column (`id_column`)
    jsonl     one JSON object per line, same columns; blank lines are not records
    text      one line = one row (any other suffix; directories: their *.txt files)
Row ids: the id column's value as a string when there is one; otherwise the first 16 hex
digits of the SHA-256 of the text (UTF-8), so ids survive re-reads, re-splits and reorders.
Identical texts without an id column therefore share an id (and, decoded greedily, an output).

Output, under `output_uri`:
    part-<h>.parquet          id, input, output, style (+ retrieval: per-row source weights,
                              when a row styler is used); one file per actor call, written
                              atomically and named by the hash of its ids
    _errors/part-<h>.parquet  id, input, reason — null, non-string, empty/whitespace-only,
                              undecodable UTF-8, malformed JSON, over `max_input_tokens`
    _summary.json             settings and status ("running" from the start of a run,
                              "complete" with the run's counts and seconds at its end)
(names starting with "_" are skipped by Parquet dataset readers). A re-run reads the ids
already in parts and errors, skips those rows and restyles only the rest; it refuses an
output written with different model, adapter, style or decoding settings.

Modes: "adapted" loads one PEFT adapter and merges it into the weights (`adapter=None`
restyles with the bare base model). "instance" / "mixture" give every row its own LoRA
through `ray_twist.rowlora`; they take a `row_styler` factory, built once per actor, that
maps a batch of texts to per-row factors and source weights (the pool-backed retrieval
factory plugs in here).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from ray_twist import storage
from ray_twist.backbone import Backbone, load_backbone
from ray_twist.generation import GenerationSettings, encode, generate_ids
from ray_twist.rowlora import RowFactors

Mode = Literal["adapted", "instance", "mixture"]
MODES: tuple[Mode, ...] = ("adapted", "instance", "mixture")
InputFormat = Literal["parquet", "jsonl", "text"]
#: Texts of a batch → (per-row LoRA factors by module, per-row {source → weight}).
RowStyler = Callable[[list[str]], tuple[dict[str, RowFactors], list[dict[str, float]]]]
#: Built once per actor from the loaded base model.
RowStylerFactory = Callable[[Backbone], RowStyler]

#: Test hook: actors raise after writing this many parts (a run "killed" half-way).
FAIL_AFTER_PARTS_ENV = "RAY_TWIST_RESTYLE_FAIL_AFTER_PARTS"
ERRORS_DIR, SUMMARY_FILE = "_errors", "_summary.json"
_SUFFIXES: dict[str, InputFormat] = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
_EXTENSIONS: dict[InputFormat, list[str]] = {
    "parquet": ["parquet"],
    "jsonl": ["jsonl", "json"],
    "text": ["txt"],
}
_OUTPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("input", pa.string()), ("output", pa.string()), ("style", pa.string())]
)
_RETRIEVAL_TYPE = pa.list_(pa.struct([("source", pa.string()), ("weight", pa.float64())]))
_ROW_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("reason", pa.string())])
_ERROR_SCHEMA = pa.schema([("id", pa.string()), ("input", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class RestyleJob:
    """Everything an actor needs; `identity()` names what defines the output's content."""

    input_uri: str
    output_uri: str
    base_model: str
    adapter: str | None
    mode: Mode
    style: str | None
    settings: GenerationSettings
    max_input_tokens: int
    text_column: str
    id_column: str
    batch_size: int = 16
    dtype: str = "float32"
    num_cpus: float = 1.0
    row_styler: RowStylerFactory | None = None

    def identity(self) -> dict[str, Any]:
        """The settings an existing output must have been written with to be resumed."""
        keep = ("input_uri", "base_model", "adapter", "mode", "style", "max_input_tokens",
                "text_column", "id_column")  # fmt: skip
        return {**{k: getattr(self, k) for k in keep}, "settings": asdict(self.settings)}


# ---------------------------------------------------------------- reading and validation


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


# ---------------------------------------------------------------- the actor


def _local_adapter(uri: str) -> str:
    """An adapter URI as a local directory (object-store adapters are copied once)."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    local = tempfile.mkdtemp(prefix="twist-adapter-")
    storage.download_dir(uri, local)
    return local


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class Restyler:
    """Ray Data actor: loads the base model (+ adapter) once, then per call restyles the rows
    not yet done and writes their outputs and errors as one part file each."""

    def __init__(
        self, job: RestyleJob, done_ids: frozenset[str], fail_after_parts: int | None = None
    ) -> None:
        torch.set_num_threads(max(1, round(job.num_cpus)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.job, self.done = job, done_ids
        self.backbone = load_backbone(job.base_model, getattr(torch, job.dtype), device)
        if job.adapter is not None and job.mode == "adapted":
            from peft import PeftModel

            peft = PeftModel.from_pretrained(self.backbone.model, _local_adapter(job.adapter))
            self.backbone.model = peft.merge_and_unload().eval()
        self.row_styler = job.row_styler(self.backbone) if job.row_styler else None
        self.style = job.style or (Path(job.adapter).name if job.adapter else None)
        self.fail_after, self.parts = fail_after_parts, 0

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        if self.fail_after is not None and self.parts >= self.fail_after:
            raise RuntimeError(
                f"injected failure after {self.parts} parts ({FAIL_AFTER_PARTS_ENV})"
            )
        rows = [r for r in batch.to_pylist() if r["id"] not in self.done]
        errors = [(r, r["reason"]) for r in rows if r["reason"]]
        good = [r for r in rows if not r["reason"]]
        limit = self.job.max_input_tokens
        ids = encode(self.backbone, [r["text"] for r in good])
        fits = [len(x) <= limit for x in ids]
        errors += [
            (r, f"too long: {len(x)} tokens > max_input_tokens={limit}")
            for r, x, ok in zip(good, ids, fits, strict=True)
            if not ok
        ]
        good = [r for r, ok in zip(good, fits, strict=True) if ok]
        ids = [x for x, ok in zip(ids, fits, strict=True) if ok]
        output = self._restyle(good, ids) if good else None
        name = f"part-{hashlib.sha256(' '.join(r['id'] for r in rows).encode()).hexdigest()[:16]}"
        if errors:
            table = pa.table(
                {"id": [r["id"] for r, _ in errors], "input": [r["text"] for r, _ in errors],
                 "reason": [reason for _, reason in errors]}, schema=_ERROR_SCHEMA,
            )  # fmt: skip
            self._write(f"{ERRORS_DIR}/{name}.parquet", table)
        if output is not None:
            self._write(f"{name}.parquet", output)
        self.parts += 1
        seconds = time.perf_counter() - start
        counts = {"rows": batch.num_rows, "written": len(good), "errors": len(errors)}
        return {"seconds": np.array([seconds]), **{k: np.array([v]) for k, v in counts.items()}}

    def _restyle(self, rows: list[dict[str, Any]], ids: list[list[int]]) -> pa.Table:
        texts = [r["text"] for r in rows]
        factors, weights = self.row_styler(texts) if self.row_styler else (None, None)
        outputs = generate_ids(self.backbone, ids, self.job.settings, self.job.batch_size, factors)
        table = pa.table(
            {"id": [r["id"] for r in rows], "input": texts, "output": outputs,
             "style": [self.style] * len(rows)}, schema=_OUTPUT_SCHEMA,
        )  # fmt: skip
        if weights is not None:
            retrieval = [
                [{"source": s, "weight": float(w)} for s, w in row.items()] for row in weights
            ]
            table = table.append_column("retrieval", pa.array(retrieval, type=_RETRIEVAL_TYPE))
        return table

    def _write(self, relative: str, table: pa.Table) -> None:
        storage.write_bytes_atomic(
            storage.join(self.job.output_uri, relative), _parquet_bytes(table)
        )


# ---------------------------------------------------------------- the driver


def done_ids(output_uri: str) -> frozenset[str]:
    """Ids already restyled (or set aside as errors) under an output."""
    fs, root = storage.resolve(output_uri)
    found: set[str] = set()
    for folder in (root, f"{root}/{ERRORS_DIR}"):
        if fs.get_file_info(folder).type != pafs.FileType.Directory:
            continue
        parts = [
            f.path
            for f in fs.get_file_info(pafs.FileSelector(folder))
            if f.is_file and f.base_name.endswith(".parquet") and f.base_name[0] not in "._"
        ]
        if parts:
            table = pads.dataset(parts, filesystem=fs, format="parquet").to_table(columns=["id"])
            found.update(table.column("id").to_pylist())
    return frozenset(found)


def _start_record(output_uri: str, job: RestyleJob) -> None:
    """Refuse to resume an output written with other settings; else mark a run as started
    (before any part is written, so a killed run's settings are on record too)."""
    summary_uri = storage.join(output_uri, SUMMARY_FILE)
    current = json.loads(json.dumps(job.identity()))
    if storage.exists(summary_uri):
        previous = json.loads(storage.read_bytes(summary_uri)).get("job", current)
        if previous != current:
            changed = sorted(k for k in current if previous.get(k) != current[k])
            raise ValueError(
                f"{output_uri} was written with different settings ({', '.join(changed)}); "
                "resume with the same settings or write to a new output"
            )
    _write_json(summary_uri, {"status": "running", "job": current})


def _write_json(uri: str, record: dict[str, Any]) -> None:
    storage.write_bytes_atomic(uri, json.dumps(record, indent=2, default=str).encode())


def _worker_gpus(concurrency: tuple[int, int], num_cpus: float, num_gpus: float | None) -> float:
    """GPUs per worker (one each when the cluster has GPUs, unless given). Refuses a pool
    whose minimum size takes every CPU: its read tasks would never be scheduled."""
    import ray

    if not 1 <= concurrency[0] <= concurrency[1]:
        raise ValueError(f"concurrency must be (min, max) with 1 <= min <= max; got {concurrency}")
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0.0)
    if concurrency[0] * num_cpus > cpus - 1:
        raise ValueError(
            f"{concurrency[0]} workers x {num_cpus} CPUs leave no CPU for reading the input "
            f"(the cluster has {cpus:g}); lower concurrency[0] or num_cpus"
        )
    if num_gpus is not None:
        return num_gpus
    return 1.0 if resources.get("GPU", 0) >= 1 else 0.0


def restyle_corpus(
    input_uri: str,
    output_uri: str,
    base_model: str,
    adapter: str | None,
    mode: str = "adapted",
    style: str | None = None,
    batch_size: int = 16,
    concurrency: tuple[int, int] = (1, 1),
    max_new_tokens: int = 32,
    max_input_tokens: int = 128,
    *,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    text_column: str = "text",
    id_column: str = "id",
    input_format: str | None = None,
    rows_per_part: int = 256,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    dtype: str = "float32",
    row_styler: RowStylerFactory | None = None,
) -> dict[str, Any]:
    """Restyle every row of `input_uri` not yet in `output_uri`; returns the run's summary.

    An autoscaling pool of `concurrency` = (min, max) actors, each with `num_cpus` and
    `num_gpus` (default: one GPU when the cluster has GPUs), takes `rows_per_part` rows per
    call and generates `batch_size` at a time. Summary: rows_in, rows_skipped_existing,
    rows_processed (= rows_written + errors: the work this run did), seconds (wall clock) and
    worker_seconds (time actors spent inside calls: restyling, validating, writing parts).
    """
    import ray.data

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if mode != "adapted" and row_styler is None:
        raise NotImplementedError(
            f"mode={mode!r} needs per-row factors: pass a row_styler factory (the pool-backed "
            "retrieval factory is not wired into restyle yet)"
        )
    if rows_per_part < 1 or batch_size < 1:
        raise ValueError("rows_per_part and batch_size must be ≥ 1")
    start = time.perf_counter()
    gpus = _worker_gpus(concurrency, num_cpus, num_gpus)
    settings = GenerationSettings(max_new_tokens, num_beams, do_sample, temperature, top_p)
    job = RestyleJob(
        input_uri, output_uri, base_model, adapter, mode, style, settings,  # type: ignore[arg-type]
        max_input_tokens, text_column, id_column, batch_size, dtype, num_cpus, row_styler,
    )  # fmt: skip
    _start_record(output_uri, job)
    done = done_ids(output_uri)
    fail_after = os.environ.get(FAIL_AFTER_PARTS_ENV)
    rows = read_rows(
        input_uri, detect_input_format(input_uri, input_format), text_column, id_column
    )
    stats = rows.map_batches(
        Restyler,
        fn_constructor_kwargs={
            "job": job,
            "done_ids": done,
            "fail_after_parts": int(fail_after) if fail_after else None,
        },
        batch_size=rows_per_part,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1]),
        num_cpus=num_cpus,
        num_gpus=gpus,
    )
    totals = {"rows": 0, "written": 0, "errors": 0, "seconds": 0.0}
    for batch in stats.iter_batches(batch_size=None, batch_format="numpy"):
        for key in totals:
            totals[key] += batch[key].sum().item()
    processed = totals["written"] + totals["errors"]
    summary = {
        "rows_in": totals["rows"],
        "rows_skipped_existing": totals["rows"] - processed,
        "rows_processed": processed,
        "rows_written": totals["written"],
        "errors": totals["errors"],
        "seconds": round(time.perf_counter() - start, 3),
        "worker_seconds": round(totals["seconds"], 3),
        "output": output_uri,
        "errors_output": storage.join(output_uri, ERRORS_DIR),
    }
    record = {"status": "complete", **summary, "job": job.identity(),
              "concurrency": list(concurrency), "batch_size": batch_size,
              "rows_per_part": rows_per_part}  # fmt: skip
    _write_json(storage.join(output_uri, SUMMARY_FILE), record)
    return summary
