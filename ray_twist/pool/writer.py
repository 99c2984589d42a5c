"""Writing a pool generation: new files first, the manifest last, old files collected.

A commit is the exclusive create of `manifests/g<N+1>.json` (`storage.create_exclusive`),
where N is the generation the writer read: of two writers that read N, one creates it and
the other gets `PoolConflictError` with nothing of its write visible. Data files never
collide: adapter dirs and keys/clusters files are named by their content. `pool.json` is
then replaced by a copy of the new manifest, for tools and for readers of format 1 pools.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ray_twist import storage
from ray_twist.backbone import PACKAGED_MINILM, BackboneNotFoundError, config_hash
from ray_twist.lora.peft_io import load_weights, read_config
from ray_twist.pool.clustering import cluster_keys
from ray_twist.pool.format import (
    _GENERATION_FILE_RE,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    KEEP_GENERATIONS,
    MANIFEST,
    PoolConflictError,
    PoolCorruptError,
    PoolMismatchError,
    _check_relpath,
    _json_default,
    _lora_layout,
    _sha256,
    _table_bytes,
    log,
    manifest_name,
    validate_name,
)
from ray_twist.pool.reader import Pool, committed_generations, newest_manifest, read_manifest
from ray_twist.retrieval import TaskKeys
from ray_twist.vectors import unit_rows

#: Garbage collection spares files younger than this: a concurrent writer's files, written
#: but not yet committed (an hour is far above any add's write-to-commit time).
GC_MIN_AGE_S = 3600.0


@dataclass
class SourceEntry:
    """One source to add: its trained PEFT adapter dir, its task keys and bookkeeping."""

    name: str
    adapter_dir: str | Path
    key: TaskKeys  # a `features.TaskKey`: the style and input key vectors
    metrics: dict[str, Any] = field(default_factory=dict)
    data_hash: str = ""


@dataclass
class _Prepared:
    entry: SourceEntry
    files: dict[str, bytes]
    hashes: dict[str, str]
    dir: str  # sources/<name>/<digest of the file hashes>
    lora: dict[str, Any]
    declared_base: str | None  # the adapter's base_model_name_or_path


def _check_declared_base(p: _Prepared, base_model: str, base_hash: str) -> None:
    """Refuse an adapter whose own config names a base of another config hash than
    `base_model` (when that base can be found here; a Hub id not in the offline cache can't
    be checked and is let through)."""
    if not p.declared_base:
        return
    try:
        declared_hash = config_hash(p.declared_base)
    except BackboneNotFoundError:
        return
    if declared_hash != base_hash:
        raise PoolMismatchError(
            f"base model mismatch: {Path(p.entry.adapter_dir) / ADAPTER_CONFIG} names "
            f"base_model_name_or_path {p.declared_base!r} (config hash {declared_hash}), not "
            f"{base_model!r} (config hash {base_hash}); its LoRA was trained on another model"
        )


def _prepare(entry: SourceEntry) -> _Prepared:
    """Read and check an adapter dir: PEFT LoRA on linear layers (any r, α, rsLoRA, rank and
    alpha patterns, target modules), safetensors only; errors name the dir or file."""
    root = Path(entry.adapter_dir)
    where = f"source {entry.name!r} ({root})"
    for rel in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (root / rel).is_file():
            raise FileNotFoundError(
                f"{where}: no {rel}; a PEFT adapter dir holds {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}"
            )
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files (editor or VCS droppings) are not part of the adapter
        try:
            files[_check_relpath(rel)] = path.read_bytes()
        except ValueError as exc:
            raise ValueError(f"source {entry.name!r}: {exc}") from None
    config = read_config(files[ADAPTER_CONFIG], str(root / ADAPTER_CONFIG))
    tensors = load_weights(files[ADAPTER_WEIGHTS], str(root / ADAPTER_WEIGHTS))
    lora = _lora_layout(config, tensors, where)
    hashes = {rel: _sha256(data) for rel, data in files.items()}
    digest = _sha256(json.dumps(hashes, sort_keys=True).encode())[:16]
    declared = config.get("base_model_name_or_path")
    return _Prepared(entry, files, hashes, f"sources/{entry.name}/{digest}", lora, declared)


def _check_same(what: str, ours: Any, theirs: Any, context: str, other: str = "the pool") -> None:
    if ours != theirs:
        raise PoolMismatchError(
            f"{what} mismatch: {context} has {ours!r} but {other} has {theirs!r}; the sources "
            "of a pool share one base model, featurizer and layer orientation (fan_in_fan_out)"
        )


def _entry_key(key: TaskKeys, name: str) -> tuple[np.ndarray, np.ndarray]:
    style, inp = np.asarray(key.style_key), np.asarray(key.input_key)
    if style.ndim != 1 or style.shape != inp.shape or not np.all(np.isfinite(style)):
        raise ValueError(f"source {name!r}: key.style_key/input_key must be finite (d,) vectors")
    return unit_rows(style), unit_rows(inp)


def _tables(
    names: list[str], keys: dict[str, tuple[np.ndarray, np.ndarray]], n_examples: list[int],
    n_clusters: int | None, seed: int,
) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    """Cluster the style keys and lay out the keys and clusters tables."""
    style = np.stack([keys[n][0] for n in names])
    labels, centroids = cluster_keys(style, n_clusters, seed)
    vectors = pa.list_(pa.float32())
    keys_table = pa.table(
        {
            "source": pa.array(names, pa.string()),
            "cluster": pa.array(labels, pa.int32()),
            "key": pa.array(style.tolist(), vectors),
            "input_key": pa.array([keys[n][1].tolist() for n in names], vectors),
            "n_examples": pa.array(n_examples, pa.int64()),
        }
    )
    members = [
        [n for n, c in zip(names, labels, strict=True) if c == i] for i in range(len(centroids))
    ]
    clusters_table = pa.table(
        {
            "cluster": pa.array(range(len(centroids)), pa.int32()),
            "key": pa.array(centroids.tolist(), vectors),
            "members": pa.array(members, pa.list_(pa.string())),
        }
    )
    return keys_table, clusters_table


def add_sources(
    uri: str | Path,
    entries: list[SourceEntry],
    base_model: str,
    featurizer: str = PACKAGED_MINILM,  # = features.DEFAULT_FEATURIZER
    n_clusters: int | None = None,
    seed: int = 0,
    keep_generations: int | None = None,
    gc_min_age_s: float = GC_MIN_AGE_S,
) -> Pool:
    """Add (or replace same-named) sources, re-cluster all style keys, commit one generation.

    Creates the pool if `uri` holds none. `n_clusters=None` picks the count by eigengap.
    The pool keeps the base model string it was created with. Raises `PoolConflictError`
    if another writer committed since this one read the pool (retry the call).

    Garbage collection after the commit keeps the files of the newest `keep_generations`
    generations (recorded in the manifest; None keeps the pool's, else `KEEP_GENERATIONS`)
    and any file modified within `gc_min_age_s` (a concurrent writer's uncommitted files).
    """
    uri = str(uri)
    if not entries:
        raise ValueError("entries is empty: nothing to add")
    if keep_generations is not None and keep_generations < 1:
        raise ValueError(f"keep_generations must be ≥ 1, got {keep_generations}")
    names = [validate_name(e.name) for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate source names in entries: {names}")
    prepared = [_prepare(e) for e in entries]
    fan = prepared[0].lora["fan_in_fan_out"]
    for p in prepared[1:]:
        first = f"source {prepared[0].entry.name!r}"
        _check_same(
            "fan_in_fan_out", p.lora["fan_in_fan_out"], fan, f"source {p.entry.name!r}", first
        )
    new_keys = {p.entry.name: _entry_key(p.entry.key, p.entry.name) for p in prepared}
    dims = {k[0].shape[0] for k in new_keys.values()}
    if len(dims) != 1:
        raise ValueError(f"entries have keys of different dimensions: {sorted(dims)}")
    base_hash = config_hash(base_model)
    for p in prepared:
        _check_declared_base(p, base_model, base_hash)
    try:
        previous: Pool | None = Pool.open(uri)
    except FileNotFoundError:
        previous = None
    keys: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    old: dict[str, Any] = {"sources": {}}
    if previous is not None:
        adapters = ", ".join(f"{e.name!r} ({e.adapter_dir})" for e in entries)
        context = f"base model {base_model!r} of {adapters}"
        pool_base = f"the pool's base model {previous.base_model!r}"
        _check_same(
            "base model config hash", base_hash, previous.base_config_hash, context, pool_base
        )
        _check_same("fan_in_fan_out", fan, previous.lora_config["fan_in_fan_out"], adapters)
        _check_same("featurizer", featurizer, previous.featurizer, "the new sources")
        _check_same("key dimension", dims.pop(), previous.style_keys.shape[1], "the new keys")
        old = previous.manifest
        keys = {
            n: (previous.style_keys[i], previous.input_keys[i])
            for i, n in enumerate(previous.sources)
        }
    keys.update(new_keys)
    keep = keep_generations or int(old.get("keep_generations", KEEP_GENERATIONS))
    if previous is not None and previous.generation not in committed_generations(uri):
        # a format-1 pool has only pool.json: record its generation, which GC then keeps
        storage.create_exclusive(storage.join(uri, manifest_name(previous.generation)), _dump(old))

    sources = {  # format 1 sources get their layout recorded
        n: {**entry, "lora": entry.get("lora") or previous.source_layout(n)}
        for n, entry in old["sources"].items()
        if previous is not None
    }
    for p in prepared:
        if old["sources"].get(p.entry.name, {}).get("dir") != p.dir:  # never rewrite named files
            for rel, data in p.files.items():
                storage.write_bytes_atomic(storage.join(uri, p.dir, rel), data)
        sources[p.entry.name] = {
            "dir": p.dir,
            "files": p.hashes,
            "n_examples": int(p.entry.key.n_examples),
            "metrics": p.entry.metrics,
            "data_hash": p.entry.data_hash,
            "lora": p.lora,
        }
    names = sorted(sources)
    n_examples = [sources[n]["n_examples"] for n in names]
    keys_table, clusters_table = _tables(names, keys, n_examples, n_clusters, seed)
    generation = previous.generation + 1 if previous else 1
    files = {}
    for kind, table in (("keys", keys_table), ("clusters", clusters_table)):
        data = _table_bytes(table)
        path = f"{kind}.g{generation:06d}.{_sha256(data)[:16]}.parquet"  # never overwritten
        storage.write_bytes_atomic(storage.join(uri, path), data)
        files[kind] = {"path": path, "sha256": _sha256(data)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "base_model": previous.base_model if previous else base_model,
        "base_config_hash": base_hash,
        "lora": {
            "fan_in_fan_out": fan,
            "target_modules": sorted(
                {m for e in sources.values() for m in e["lora"]["module_names"]}
            ),
        },
        "featurizer": featurizer,
        "key_dim": len(keys[names[0]][0]),
        "clustering": {
            "method": "spectral",
            "affinity": "cosine clipped at 0",
            "n_clusters_requested": n_clusters,
            "n_clusters": clusters_table.num_rows,
            "seed": seed,
        },
        "files": files,
        "sources": {n: sources[n] for n in names},
        "keep_generations": keep,
    }
    blob = _dump(manifest)
    if not storage.create_exclusive(storage.join(uri, manifest_name(generation)), blob):
        newest = newest_manifest(uri)
        read = f"generation {generation - 1}" if previous is not None else "no pool"
        raise PoolConflictError(
            f"pool {uri}: another writer committed generation {generation} after this write "
            f"read {read} (the pool is now at generation "
            f"{newest['generation'] if newest else '?'}); nothing of this write was committed, "
            "retry it"
        )
    try:  # committed: pool.json is a copy, and a stale one is harmless (readers take the max)
        storage.write_bytes_atomic(storage.join(uri, MANIFEST), blob)
    except OSError as exc:
        log.warning("pool %s: generation %d committed, %s not updated: %s", uri, generation,
                    MANIFEST, exc)  # fmt: skip
    _collect_garbage(uri, keep, gc_min_age_s)
    return Pool(uri, json.loads(blob), keys_table, clusters_table)


def _dump(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True, default=_json_default).encode()


def _collect_garbage(uri: str, keep: int, min_age_s: float) -> None:
    """Best effort: delete what neither the newest `keep` generations nor pool.json name.

    Older manifests go first (a reader of such a generation then sees it gone, not torn),
    then data files and adapter dirs, but none modified within `min_age_s`: a concurrent
    writer writes its files before its commit, and they must outlive a collection that
    started before that commit.
    """
    fs, root = storage.resolve(uri)
    cutoff = time.time() - min_age_s

    def listing(path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
        return fs.get_file_info(selector)

    def aged(infos: list[pafs.FileInfo]) -> bool:  # unknown mtimes (some stores) count as old
        return min_age_s <= 0 or all(
            i.mtime is None or i.mtime.timestamp() <= cutoff
            for i in infos
            if i.type == pafs.FileType.File
        )

    try:
        generations = committed_generations(uri)
        kept = [read_manifest(uri, manifest_name(g)) for g in generations[-keep:]]
        kept.append(read_manifest(uri, MANIFEST))
        named_files = {f["path"] for m in kept if m for f in m["files"].values()}
        named_dirs = {e["dir"] for m in kept if m for e in m["sources"].values()}
        for g in generations[:-keep]:
            fs.delete_file(f"{root}/{manifest_name(g)}")
        for info in listing(root):
            name = info.base_name
            if _GENERATION_FILE_RE.match(name) and name not in named_files and aged([info]):
                fs.delete_file(info.path)
        for name_dir in listing(f"{root}/sources"):
            for version in listing(name_dir.path):
                rel = f"sources/{name_dir.base_name}/{version.base_name}"
                if rel not in named_dirs and aged(listing(version.path, recursive=True)):
                    fs.delete_dir(version.path)
            if not listing(name_dir.path):
                fs.delete_dir(name_dir.path)
    except (OSError, PoolCorruptError) as exc:
        log.warning("pool %s: garbage collection skipped: %s", uri, exc)
