"""TWIST initialisation: retrieve sources for targets, merge them, write PEFT adapters.

One target (`init_target`) or thousands (`merge_targets`): targets are processed in chunks,
each chunk merged module by module with one batched core SVD over its targets, then written,
so memory stays bounded by the chunk size whatever the number of targets. The QR factors of
each module (and, for `merge_order="truncate_then_sum"`, each source's top-q SVD) are computed
once per pool generation and reused by every chunk and call. The merge order comes from the
retrieval settings (`RetrievalSettings.merge_order`); with `truncate_then_sum` an adapter's
rank is Σ_s min(q, r_s) over the sources it weights non-zero, not q (`ray_twist.merge`).

At cluster scale `merge_targets(concurrency=n)` featurizes data targets on Ray Data and
merges the chunks as parallel Ray tasks. Every adapter is written whole or not at all (its
record last, listing the files' sizes), so a re-run skips exactly the finished targets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
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
    """Write an adapter dir plus its retrieval record, locally or to an object store, so
    that the record exists only over whole files (`storage.staged_dir`): it goes in last and
    lists the adapter files' sizes, so `adapter_finished` tells a complete adapter from a
    killed writer's."""
    with storage.staged_dir(out_uri, RETRIEVAL_FILE) as stage:
        write_adapter(stage, factors, template, dtype=dtype)
        files = {f.name: f.stat().st_size for f in sorted(stage.iterdir()) if f.is_file()}
        (stage / RETRIEVAL_FILE).write_text(json.dumps({**meta, "files": files}, indent=2))
    return out_uri


def adapter_finished(uri: str, expect: dict[str, Any]) -> bool:
    """Whether `uri` holds a complete adapter written with `expect` (fields its record must
    hold, e.g. rank and weights): the record parses and matches, and every file it lists is
    there at its recorded size. A missing or truncated file, a garbled record or other
    settings mean the target is merged again."""
    try:
        record = json.loads(storage.read_bytes(storage.join(uri, RETRIEVAL_FILE)))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in expect.items()):
        return False
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return False
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info([f"{path}/{name}" for name in files])
    return all(info.type == pafs.FileType.File and info.size == size
               for info, size in zip(infos, files.values(), strict=True))  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
                      "merge_order": merge_order, "dtype": _dtype_name(out_dtype)}  # fmt: skip
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
    concurrency: int = 0,
    num_gpus: float = 0,
) -> list[str]:
    """Adapters for many targets under `out_uri/<name>/`, one batched merge per module and
    chunk of `chunk_size` targets; each adapter is written whole or not at all, and targets
    whose adapter is already complete there for the same settings are skipped, so a re-run
    after a crash finishes the rest.

    `concurrency` 0: featurize and merge in this process (on `device`). n > 0: data targets
    are featurized on Ray Data (n actors) and the chunks merged as Ray tasks, at most n at a
    time, anywhere on the cluster; with `num_gpus` each actor and task holds that much GPU
    and merges on CUDA. A chunk holds the same targets either way.
    """
    if concurrency < 0 or num_gpus < 0:
        raise ValueError(f"concurrency and num_gpus must be >= 0, got {concurrency}, {num_gpus}")
    params = params or RetrievalSettings()
    uris = [storage.join(out_uri, t.name) for t in targets]
    meta = [_retrieval_meta(pool, params, t.name) if t.weights is None else {"target": t.name}
            for t in targets]  # fmt: skip
    common = {"rank": rank, "method": method, "merge_order": params.merge_order,
              "dtype": _dtype_name(out_dtype)}  # fmt: skip
    todo = [
        i
        for i, t in enumerate(targets)
        if not adapter_finished(uris[i], {**common, **meta[i],
                                          **({} if t.weights is None else {"weights": t.weights})})
    ]  # fmt: skip
    needs_data = [targets[i] for i in todo if targets[i].weights is None]
    retrieved: dict[str, dict[str, float]] = {}
    if needs_data:
        keys = target_keys(pool, needs_data, params.key_examples, concurrency, num_gpus)
        weights = retrieval_weights(pool, keys, params)
        retrieved = {t.name: w for t, w in zip(needs_data, weights, strict=True)}
    rows = [w if (w := targets[i].weights) is not None else retrieved[targets[i].name]
            for i in todo]  # fmt: skip
    todo_uris, todo_meta = [uris[i] for i in todo], [meta[i] for i in todo]
    if concurrency == 0:
        sources = pool_merge_sources(pool, device=device)
        merge_weighted(sources, todo_uris, rows, rank, method, chunk_size, out_dtype, todo_meta,
                       merge_order=params.merge_order)  # fmt: skip
        return uris
    import ray

    task = ray.remote(num_cpus=1, num_gpus=num_gpus)(_merge_chunk)
    pending: list[Any] = []
    for lo in range(0, len(todo), chunk_size):
        if len(pending) >= concurrency:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        part = slice(lo, lo + chunk_size)
        pending.append(task.remote(pool.uri, pool.generation, todo_uris[part], rows[part],
                                   todo_meta[part], rank, method, out_dtype,
                                   params.merge_order, num_gpus > 0))  # fmt: skip
    ray.get(pending)
    return uris


def _merge_chunk(
    pool_uri: str,
    generation: int,
    uris: list[str],
    rows: list[dict[str, float]],
    meta: list[dict[str, Any]],
    rank: int,
    method: MergeMethod,
    out_dtype: torch.dtype,
    merge_order: MergeOrder,
    cuda: bool,
) -> list[str]:
    """One chunk of `merge_targets` as a Ray task: the pool generation the driver read (its
    QR factors cached per worker process), merged and written like the in-process loop."""
    device = "cuda" if cuda and torch.cuda.is_available() else None
    sources = pool_merge_sources(Pool.open(pool_uri, generation), device=device)
    return merge_weighted(sources, uris, rows, rank, method, len(uris), out_dtype, meta,
                          progress=False, merge_order=merge_order)  # fmt: skip


class _TargetKeys(Featurizer):
    """Ray Data UDF: a batch of targets (`name`, `data` URI) → their task keys. Each
    target's examples are read here, on the worker, by the same reader and `task_key` as
    the in-process path (errors name the file and line); the driver never holds them."""

    def __init__(self, key_examples: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_examples = key_examples

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ray_twist.data.readers import read_task

        keys = [task_key(read_task(str(uri), name=str(name)), self, self.key_examples)
                for name, uri in zip(batch["name"], batch["data"], strict=True)]  # fmt: skip
        return {"name": batch["name"], "style_key": np.stack([k.style_key for k in keys]),
                "input_key": np.stack([k.input_key for k in keys]),
                "n_examples": np.array([k.n_examples for k in keys])}  # fmt: skip


def target_keys(
    pool: Pool,
    targets: Sequence[TargetSpec],
    key_examples: int | None,
    concurrency: int = 0,
    num_gpus: float = 0,
) -> list[TaskKey]:
    """Task keys of data targets with the pool's featurizer, in order: in this process
    (`concurrency` 0), or on Ray Data with one target per batch over `concurrency` actors
    (the model loaded once per actor; `num_gpus` each)."""
    from ray_twist.data.readers import read_task

    if concurrency == 0:
        featurizer = Featurizer(pool.featurizer)
        return [task_key(read_task(t.data or "", name=t.name), featurizer, key_examples)
                for t in targets]  # fmt: skip
    import ray.data

    ds = ray.data.from_items([{"name": t.name, "data": t.data} for t in targets]).map_batches(
        _TargetKeys,
        fn_constructor_kwargs={"key_examples": key_examples, "model": pool.featurizer},
        batch_size=1,
        concurrency=concurrency,
        num_gpus=num_gpus,
    )
    keys = {}
    for row in ds.iter_rows():
        keys[row["name"]] = TaskKey(np.asarray(row["style_key"]), np.asarray(row["input_key"]),
                                    int(row["n_examples"]))  # fmt: skip
    return [keys[t.name] for t in targets]


def run_merge_targets(cfg: MergeTargetsConfig) -> list[str]:
    """The whole batched-merge job from its config (CUDA when it holds a GPU)."""
    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    return merge_targets(Pool.open(cfg.pool), read_targets(cfg.targets), cfg.out, cfg.rank,
                         cfg.retrieval, cfg.method, cfg.chunk_size, device, dtype,
                         cfg.concurrency, cfg.num_gpus)  # fmt: skip


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
    num_gpus: float = Field(default=0, ge=0, description="GPUs per merge task (CUDA merge)")
    concurrency: int = Field(
        default=0,
        ge=0,
        description="0: one Ray task merges every chunk; n: chunks of targets run as up to n "
        "parallel Ray tasks across the cluster and data targets are featurized on Ray Data",
    )

    @model_validator(mode="after")
    def _order_needs_truncation(self) -> MergeTargetsConfig:
        if self.method == "linear" and self.retrieval.merge_order != DEFAULT_MERGE_ORDER:
            raise ValueError(
                "method linear never truncates: retrieval.merge_order truncate_then_sum needs "
                "method svd or dense-svd"
            )
        return self
