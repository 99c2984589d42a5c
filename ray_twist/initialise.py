"""TWIST initialisation: retrieve sources for targets, merge them, write PEFT adapters.

One target (`init_target`) or thousands (`merge_targets`): targets are processed in chunks,
each chunk merged module by module with one batched core SVD over its targets, then written,
so memory stays bounded by the chunk size whatever the number of targets. The QR factors of
each module (and, for `merge_order="truncate_then_sum"`, each source's top-q SVD) are computed
once per pool generation and reused by every chunk and call. The merge order comes from the
retrieval settings (`RetrievalSettings.merge_order`); with `truncate_then_sum` an adapter's
rank is Σ_s min(q, r_s) over the sources it weights non-zero, not q (`ray_twist.merge`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs
import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from ray_twist import storage
from ray_twist.data import Task
from ray_twist.features import Featurizer, TaskKey, task_key
from ray_twist.lora import write_adapter
from ray_twist.merge import DEFAULT_MERGE_ORDER, MergeMethod, MergeOrder, MergeSources
from ray_twist.pool import Pool, pool_merge_sources
from ray_twist.retrieval import RetrievalSettings, retrieval_scores
from ray_twist.settings import Settings

RETRIEVAL_FILE = "twist_retrieval.json"


def retrieval_weights(
    pool: Pool, keys: Sequence[TaskKey], params: RetrievalSettings
) -> list[dict[str, float]]:
    """R_s per target (style key at cluster level, input key at weight level)."""
    import numpy as np

    scores = retrieval_scores(
        np.stack([k.style_key for k in keys]),
        np.stack([k.input_key for k in keys]),
        pool.source_cluster_keys(),
        pool.input_keys,
        params.lam,
        params.tau,
        params.top_k,
    )
    return [dict(zip(pool.sources, map(float, row), strict=True)) for row in scores]


def _write_one(out_uri: str, factors: dict, template: dict, meta: dict, dtype: torch.dtype) -> str:
    """Write an adapter dir (plus its retrieval record) locally or to an object store."""
    fs, path = storage.resolve(out_uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(path) if local else Path(tmp) / "adapter"
        write_adapter(target, factors, template, dtype=dtype)
        (target / RETRIEVAL_FILE).write_text(json.dumps(meta, indent=2))
        if not local:
            storage.upload_dir(target, out_uri)
    return out_uri


def merge_weighted(
    sources: MergeSources,
    out_uris: Sequence[str],
    weights: Sequence[dict[str, float]],
    rank: int,
    method: MergeMethod = "svd",
    chunk_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
    meta: Sequence[dict[str, Any]] | None = None,
    progress: bool = True,
    merge_order: MergeOrder = DEFAULT_MERGE_ORDER,
) -> list[str]:
    """Merge and write one adapter per weights row to its URI, `chunk_size` targets at a time."""
    bar = tqdm(total=len(out_uris), desc="merge", unit="target", disable=not progress)
    for lo in range(0, len(out_uris), chunk_size):
        merged = sources.merge(list(weights[lo : lo + chunk_size]), rank, method, merge_order)
        for i, factors in enumerate(merged, start=lo):
            record = {"weights": weights[i], "rank": rank, "method": method,
                      "merge_order": merge_order}  # fmt: skip
            record.update(meta[i] if meta else {})
            _write_one(out_uris[i], factors, sources.template, record, out_dtype)
        bar.update(len(merged))
    bar.close()
    return list(out_uris)


def _retrieval_meta(pool: Pool, params: RetrievalSettings, target: str) -> dict[str, Any]:
    return {"target": target, "lambda": params.lam, "tau": params.tau, "top_k": params.top_k,
            "pool": pool.uri, "pool_generation": pool.generation}  # fmt: skip


def init_target(
    pool: Pool,
    task: Task,
    out_dir: str,
    rank: int,
    params: RetrievalSettings | None = None,
    method: MergeMethod = "svd",
    featurizer: Featurizer | None = None,
) -> dict[str, float]:
    """Write the TWIST initialisation of one target task at `out_dir`; return its R_s."""
    params = params or RetrievalSettings()
    key = task_key(task, featurizer or Featurizer(pool.featurizer), params.key_examples)
    [weights] = retrieval_weights(pool, [key], params)
    merge_weighted(pool_merge_sources(pool), [out_dir], [weights], rank, method,
                   meta=[_retrieval_meta(pool, params, task.name)], progress=False,
                   merge_order=params.merge_order)  # fmt: skip
    return weights


@dataclass(frozen=True)
class TargetSpec:
    """One row of a targets table: explicit weights, or target data to retrieve with."""

    name: str
    weights: dict[str, float] | None = None
    data: str | None = None


def read_targets(uri: str) -> list[TargetSpec]:
    """Targets table (JSONL / CSV / Parquet): `name` plus `weights` (object or JSON) or `data`."""
    from ray_twist.data.readers import DataError, read_records
    from ray_twist.pool import validate_name

    specs = []
    for where, row in read_records(uri, ["name"], ["weights", "data"]):
        name, weights, data = row.get("name"), row.get("weights"), row.get("data")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: field 'name' is missing or empty")
        validate_name(name, "target name")
        if isinstance(weights, str) and weights.strip():
            try:
                weights = json.loads(weights)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: field 'weights' is not JSON: {exc}") from exc
        if (weights is None) == (not data):
            raise DataError(f"{where}: give exactly one of 'weights' or 'data'")
        if weights is not None and not (
            isinstance(weights, dict) and all(isinstance(v, int | float) for v in weights.values())
        ):
            raise DataError(f"{where}: field 'weights' must map source names to numbers")
        specs.append(TargetSpec(name, weights, data or None))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataError(f"{uri}: target names are not unique")
    return specs


def merge_targets(
    pool: Pool,
    targets: Sequence[TargetSpec],
    out_uri: str,
    rank: int,
    params: RetrievalSettings | None = None,
    method: MergeMethod = "svd",
    chunk_size: int = 128,
    device: str | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Adapters for many targets under `out_uri/<name>/`, one batched merge per module."""
    from ray_twist.data.readers import read_task

    params = params or RetrievalSettings()
    needs_data = [t for t in targets if t.weights is None]
    retrieved: dict[str, dict[str, float]] = {}
    if needs_data:
        featurizer = Featurizer(pool.featurizer)
        keys = [
            task_key(read_task(t.data or "", name=t.name), featurizer, params.key_examples)
            for t in needs_data
        ]
        weights = retrieval_weights(pool, keys, params)
        retrieved = {t.name: w for t, w in zip(needs_data, weights, strict=True)}
    rows = [t.weights if t.weights is not None else retrieved[t.name] for t in targets]
    meta = [_retrieval_meta(pool, params, t.name) if t.weights is None else {"target": t.name}
            for t in targets]  # fmt: skip
    uris = [storage.join(out_uri, t.name) for t in targets]
    sources = pool_merge_sources(pool, device=device)
    return merge_weighted(sources, uris, rows, rank, method, chunk_size, out_dtype, meta,
                          merge_order=params.merge_order)  # fmt: skip


def run_merge_targets(cfg: MergeTargetsConfig) -> list[str]:
    """The whole batched-merge job from its config (CUDA when it holds a GPU)."""
    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    return merge_targets(Pool.open(cfg.pool), read_targets(cfg.targets), cfg.out, cfg.rank,
                         cfg.retrieval, cfg.method, cfg.chunk_size, device, dtype)  # fmt: skip


# ---------------------------------------------------------------- settings


class MergeTargetsConfig(Settings):
    """jobs/merge_targets.py: TWIST initialisations for many targets in one batched job."""

    pool: str = Field(description="pool URI")
    targets: str = Field(description="targets table: name + weights, or name + data URI")
    out: str = Field(description="output URI; one PEFT adapter per target at <out>/<name>/")
    rank: int = Field(default=16, ge=1, description="rank q kept from each merged SVD")
    method: Literal["svd", "linear", "dense-svd"] = "svd"
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    chunk_size: int = Field(default=128, ge=1, description="targets per batched core SVD")
    dtype: Literal["fp32", "bf16"] = Field(default="fp32", description="stored adapter precision")
    num_gpus: float = Field(default=0, ge=0, description="GPUs for the merge task (CUDA merge)")

    @model_validator(mode="after")
    def _order_needs_truncation(self) -> MergeTargetsConfig:
        if self.method == "linear" and self.retrieval.merge_order != DEFAULT_MERGE_ORDER:
            raise ValueError(
                "method linear never truncates: retrieval.merge_order truncate_then_sum needs "
                "method svd or dense-svd"
            )
        return self
