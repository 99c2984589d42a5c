"""The Ray Data actor of bulk restyling: one model (+ adapter or pool) per actor, one part per call."""

from __future__ import annotations

import hashlib
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
from ray_twist.generation import GenerationSettings, encode
from ray_twist.lora import Mode, RowAdapters, RowMode, apply_adapter
from ray_twist.retrieval import InstanceRetrievalSettings, applied_retrieval
from ray_twist.styler import Part, Styler, weight_dicts

#: Texts of a batch → (per-row LoRA factors by module, per-row {source → weight}).
RowStyler = Callable[[list[str]], tuple[RowAdapters, list[dict[str, float]]]]
#: Built once per actor from the loaded base model.
RowStylerFactory = Callable[[Backbone], RowStyler]

ERRORS_DIR, SUMMARY_FILE = "_errors", "_summary.json"
OUTPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("input", pa.string()), ("output", pa.string()), ("style", pa.string())]
)
#: The `weights` column of per-row modes: source name → retrieval weight (Parquet MAP).
WEIGHTS_TYPE = pa.map_(pa.string(), pa.float64())
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("input", pa.string()), ("reason", pa.string())])


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


class Restyler:
    """Ray Data actor: loads the base model (+ adapter, or pool) once, then per call restyles
    the rows not yet done and writes their outputs and errors as one part file each."""

    def __init__(self, job: RestyleJob, done_ids: frozenset[str]) -> None:
        torch.set_num_threads(max(1, round(job.num_cpus)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.job, self.done = job, done_ids
        self.backbone = load_backbone(job.base_model, getattr(torch, job.dtype), device)
        if job.adapter is not None and job.mode == "adapted":
            self.backbone.model = apply_adapter(self.backbone.model, job.adapter)
        self.styler = _styler(job, self.backbone, device)
        self.row_styler = job.row_styler(self.backbone) if job.row_styler is not None else None
        self.style = job.style or (Path(job.adapter).name if job.adapter else None)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        start = time.perf_counter()
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
                 "reason": [reason for _, reason in errors]}, schema=ERROR_SCHEMA,
            )  # fmt: skip
            self._write(f"{ERRORS_DIR}/{name}.parquet", table)
        if output is not None:
            self._write(f"{name}.parquet", output)
        seconds = time.perf_counter() - start
        counts = {"rows": batch.num_rows, "written": len(good), "errors": len(errors)}
        return {"seconds": np.array([seconds]), **{k: np.array([v]) for k, v in counts.items()}}

    def _restyle(self, rows: list[dict[str, Any]], ids: list[list[int]]) -> pa.Table:
        """Restyle one part's rows; per-row modes get their factors (and weights) for all of
        them at once, then decode `batch_size` rows per forward pass, as serving does."""
        texts = [r["text"] for r in rows]
        factors, weights = self.row_styler(texts) if self.row_styler else (None, None)
        part = Part(texts, ids, self.job.mode, self.job.settings, self.job.style, factors=factors)
        [styled], _ = self.styler.run([part], self.job.batch_size)
        if styled.weights is not None:
            weights = weight_dicts(self.styler.names, styled.weights)
        outputs = styled.outputs
        table = pa.table(
            {"id": [r["id"] for r in rows], "input": texts, "output": outputs,
             "style": [self.style] * len(rows)}, schema=OUTPUT_SCHEMA,
        )  # fmt: skip
        if weights is not None:
            table = table.append_column("weights", pa.array(weights, type=WEIGHTS_TYPE))
        return table

    def _write(self, relative: str, table: pa.Table) -> None:
        storage.write_bytes_atomic(
            storage.join(self.job.output_uri, relative), _parquet_bytes(table)
        )
