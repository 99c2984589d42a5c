"""The Ray Data actor of bulk restyling: one model (+ adapter or pool) per actor, one part per call."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_twist import storage
from ray_twist.backbone import Backbone, load_backbone
from ray_twist.data.ranges import file_key
from ray_twist.generation import GenerationSettings, encode
from ray_twist.lora import Mode, RowAdapters, RowMode, apply_adapter
from ray_twist.retrieval import InstanceRetrievalSettings, applied_retrieval
from ray_twist.styler import Part, Styler, weight_dicts

#: Texts of a batch → (per-row LoRA factors by module, per-row {source → weight}).
RowStyler = Callable[[list[str]], tuple[RowAdapters, list[dict[str, float]]]]
#: Built once per actor from the loaded base model.
RowStylerFactory = Callable[[Backbone], RowStyler]

ERRORS_DIR, SUMMARY_FILE = "_errors", "_summary.json"
#: Parts named by the input lines they hold (`part_name`): outputs of older layouts (named
#: by a hash of their ids) are not resumed.
PART_LAYOUT = "file-lines"
OUTPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("input", pa.string()), ("output", pa.string()), ("style", pa.string())]
)
#: The `weights` column of per-row modes: source name → retrieval weight (Parquet MAP).
WEIGHTS_TYPE = pa.map_(pa.string(), pa.float64())
ERROR_SCHEMA = pa.schema(
    [("id", pa.string()), ("input", pa.string()), ("reason", pa.string()), ("file", pa.string()),
     ("line", pa.int64())]
)  # fmt: skip


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
    pool: str | None = None
    pool_generation: int | None = None
    retrieval: InstanceRetrievalSettings | None = None
    merge_budget_bytes: int = 256 << 20

    def identity(self) -> dict[str, Any]:
        """The settings an existing output must have been written with to be resumed; its
        retrieval λ is the λ applied (0 without a style), so an output written before
        style-less rows were retrieved at the instance level alone is not resumed."""
        keep = ("input_uri", "base_model", "adapter", "mode", "style", "max_input_tokens",
                "text_column", "id_column", "pool", "pool_generation")  # fmt: skip
        retrieval, applied = None, self.applied()
        if self.retrieval is not None and applied is not None:
            retrieval = {**self.retrieval.model_dump(), "lam": applied["lambda"]}
        return {
            **{k: getattr(self, k) for k in keep},
            "part_layout": PART_LAYOUT,
            "retrieval": retrieval,
            "settings": asdict(self.settings),
        }

    def applied(self) -> dict[str, Any] | None:
        """Pool jobs: what every row's weights (and instance-mode merge) are computed with —
        the applied λ and its levels, τ, top-k, and in instance mode rank and merge order."""
        if self.retrieval is None or self.pool is None:
            return None
        out = applied_retrieval(self.retrieval, self.style is not None)
        if self.mode == "instance":
            out.update(rank=self.retrieval.rank, merge_order=self.retrieval.merge_order)
        return out


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _styler(job: RestyleJob, backbone: Backbone, device: str) -> Styler:
    """The styler serving runs too (`ray_twist.styler`), over the job's pool if it has one.

    Every actor of a run, even one started after a commit, opens the generation the run
    started at (its record names it), so one output never mixes generations; that holds
    while garbage collection keeps the generation (`keep_generations` commits).
    """
    if job.pool is None:
        return Styler(backbone)
    from ray_twist.pool import Pool, PoolGenerationGoneError

    try:
        pool = Pool.open(job.pool, generation=job.pool_generation)
    except PoolGenerationGoneError as exc:
        raise RuntimeError(
            f"{exc}; this run started at generation {job.pool_generation} (the pool changed "
            "mid-run): restyle to a new output"
        ) from exc
    mode: RowMode = "mixture" if job.mode == "mixture" else "instance"
    return Styler(backbone, pool, job.retrieval, device, modes=(mode,))


def part_name(file: str, first: int, last: int, rows: int) -> str:
    """A run's part file: its input file's key, its first and last line, its row count (the
    same name under `_errors/`); a resumed job skips the lines of every finished run."""
    return f"part-{file_key(file)}-{first:012d}-{last:012d}-{rows}.parquet"


def _runs(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A batch's rows as runs: rows of one read range with consecutive `seq`, in order, so
    no line between a run's first and last is left to another part."""
    rows = sorted(rows, key=lambda r: (r["range"], r["seq"]))
    runs: list[list[dict[str, Any]]] = []
    for row in rows:
        last = runs[-1][-1] if runs else None
        if last is not None and (last["range"], last["seq"] + 1) == (row["range"], row["seq"]):
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def _row_bytes(factors: RowAdapters) -> float:
    """Bytes per row of per-row factors (a shared stack counts only its per-row weights)."""
    total = 0.0
    for f in factors.values():
        own = (f.a, f.b) if f.scale is None else (f.scale,)
        total += sum(t.numel() * t.element_size() for t in own) / max(f.rows, 1)
    return total


class Restyler:
    """Ray Data actor: loads the base model (+ adapter, or pool) once, then per call restyles
    its rows, run by run (`_runs`), writing each run's errors, then its outputs (maybe none),
    as one part file each: a run whose output part exists is done."""

    def __init__(self, job: RestyleJob) -> None:
        torch.set_num_threads(max(1, round(job.num_cpus)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.job = job
        self.backbone = load_backbone(job.base_model, getattr(torch, job.dtype), device)
        if job.adapter is not None and job.mode == "adapted":
            self.backbone.model = apply_adapter(self.backbone.model, job.adapter)
        self.styler = _styler(job, self.backbone, device)
        self.row_styler = job.row_styler(self.backbone) if job.row_styler is not None else None
        self.style = job.style or (Path(job.adapter).name if job.adapter else None)
        self.chunk_rows: int | None = None

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        counts = {"rows": batch.num_rows, "written": 0, "errors": 0}
        for run in _runs(batch.to_pylist()):
            written, errors = self._run(run)
            counts["written"] += written
            counts["errors"] += errors
        seconds = time.perf_counter() - start
        return {"seconds": np.array([seconds]), **{k: np.array([v]) for k, v in counts.items()}}

    def _run(self, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """Restyle one run and write its parts; (rows written, errors)."""
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
        name = part_name(rows[0]["file"], rows[0]["line"], rows[-1]["line"], len(rows))
        if errors:
            errors.sort(key=lambda e: e[0]["seq"])
            table = pa.table(
                {"id": [r["id"] for r, _ in errors], "input": [r["text"] for r, _ in errors],
                 "reason": [reason for _, reason in errors],
                 "file": [r["file"] for r, _ in errors], "line": [r["line"] for r, _ in errors]},
                schema=ERROR_SCHEMA,
            )  # fmt: skip
            self._write(f"{ERRORS_DIR}/{name}", table)
        self._write(name, self._restyle(good, ids))  # last: the run is done
        return len(good), len(errors)

    def _restyle(self, rows: list[dict[str, Any]], ids: list[list[int]]) -> pa.Table:
        """Restyle a run's rows (any number, none included). Per-row modes build factors
        (retrieve and merge) `merge_chunk` rows at a time, so a run never holds more than
        `merge_budget_bytes` of factors; each chunk decodes `batch_size` rows per forward
        pass, as serving does."""
        texts = [r["text"] for r in rows]
        outputs: list[str] = []
        weights: list[dict[str, float]] | None = None if self.job.mode == "adapted" else []
        step = self._merge_chunk(texts) if weights is not None and texts else max(len(texts), 1)
        for lo in range(0, len(texts), step):
            chunk, chunk_ids = texts[lo : lo + step], ids[lo : lo + step]
            factors, given = self.row_styler(chunk) if self.row_styler else (None, None)
            part = Part(chunk, chunk_ids, self.job.mode, self.job.settings, self.job.style,
                        factors=factors)  # fmt: skip
            [styled], _ = self.styler.run([part], self.job.batch_size)
            outputs += styled.outputs
            if styled.weights is not None:
                given = weight_dicts(self.styler.names, styled.weights)
            if weights is not None:
                weights += given or []
        table = pa.table(
            {"id": [r["id"] for r in rows], "input": texts, "output": outputs,
             "style": [self.style] * len(rows)}, schema=OUTPUT_SCHEMA,
        )  # fmt: skip
        if weights is not None:
            table = table.append_column("weights", pa.array(weights, type=WEIGHTS_TYPE))
        return table

    def _merge_chunk(self, texts: list[str]) -> int:
        """Rows whose factors fit `merge_budget_bytes` (measured once per actor on one row's
        factors), a multiple of `batch_size` when at least one batch fits, so the forward
        passes are the same whatever the budget."""
        if self.chunk_rows is None:
            if self.row_styler is not None:
                probe = self.row_styler(texts[:1])[0]
            else:
                n = len(self.styler.names)
                mode: RowMode = "mixture" if self.job.mode == "mixture" else "instance"
                probe = self.styler.row_factors(np.full((1, n), 1.0 / n), mode)
            rows = max(1, int(self.job.merge_budget_bytes // max(_row_bytes(probe), 1.0)))
            batch = self.job.batch_size
            self.chunk_rows = rows - rows % batch if rows >= batch else rows
        return self.chunk_rows

    def _write(self, relative: str, table: pa.Table) -> None:
        storage.write_bytes_atomic(
            storage.join(self.job.output_uri, relative), _parquet_bytes(table)
        )
