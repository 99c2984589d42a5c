"""The weight pool: source LoRAs with their keys, on a local directory or an object store.

Layout under the pool URI (local path, file://, s3://, gs:// — all through pyarrow.fs)::

    pool.json                      manifest and the single commit point
    keys.g000003.parquet           source, cluster, key, input_key, n_examples
    clusters.g000003.parquet       cluster, key, members
    sources/<name>/<digest>/       a PEFT adapter dir (adapter_config.json +
                                   adapter_model.safetensors); digest = content hash

This refines DESIGN.md's fixed names (`keys.parquet`, `clusters.parquet`,
`sources/<name>/`): data files are versioned by generation and adapter dirs by content,
so a writer never overwrites a file the current `pool.json` names. A writer writes every
new file first and replaces `pool.json` last (atomic rename locally, one PUT on object
stores); a write killed at any point leaves the previous generation intact and readable.
After a commit, files named by neither the new nor the previous manifest are deleted, so a
reader that opened the previous generation keeps working.

Readers read only what `pool.json` names and check each file's sha256
(`PoolCorruptError` names the file). Only safetensors weights are accepted. All sources
share one base model (config hash), one LoRA layout and one featurizer
(`PoolMismatchError`). Keys: `key` is the style key (clustering, task-level retrieval),
`input_key` the input key (instance-level retrieval); see `ray_twist.features`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from ray_twist import storage
from ray_twist.backbone import config_hash
from ray_twist.features import DEFAULT_FEATURIZER, TaskKey
from ray_twist.merge.peft_io import lora_factors

FORMAT_VERSION = 1
MANIFEST = "pool.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{16}$")
_GENERATION_FILE_RE = re.compile(r"^(keys|clusters)\.g\d{6}\.parquet$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

log = logging.getLogger(__name__)


class PoolCorruptError(RuntimeError):
    """A file pool.json names is missing, fails its sha256, or the manifest is malformed."""


class PoolMismatchError(ValueError):
    """Adapters that cannot share a pool: different base model, LoRA layout or featurizer."""


class PoolConflictError(RuntimeError):
    """Another writer committed a new generation while this write was in progress."""


def validate_name(name: str, what: str = "source name") -> str:
    """Names become path components: refuse separators, `..` and anything odd."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_', '-' "
            "(starting with a letter or digit; no path separators, no '..')"
        )
    return name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _check_relpath(rel: str) -> str:
    parts = rel.split("/")
    if not all(_NAME_RE.match(p) and ".." not in p for p in parts):
        raise ValueError(f"invalid adapter file name {rel!r}")
    if rel.lower().endswith(_PICKLE_SUFFIXES):
        raise ValueError(f"adapter file {rel!r} is a pickle-based format; safetensors only")
    return rel


def _lora_layout(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The LoRA fields a pool pins, from an adapter_config.json; refuse what TWIST can't merge."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{where}: DoRA and per-module rank/alpha patterns are not supported")
    targets = cfg.get("target_modules")
    return {
        "r": int(cfg["r"]),
        "lora_alpha": float(cfg["lora_alpha"]),
        "target_modules": sorted(targets) if isinstance(targets, list | tuple) else targets,
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out", False)),
        "use_rslora": bool(cfg.get("use_rslora", False)),
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------- clustering


def _eigengap_k(affinity: np.ndarray) -> int:
    """Clusters = largest gap in the normalised Laplacian's spectrum (≥ connected parts)."""
    inv = 1.0 / np.sqrt(affinity.sum(axis=1))
    lap = np.eye(len(affinity)) - inv[:, None] * affinity * inv[None, :]
    eig = np.clip(np.linalg.eigvalsh(lap), 0.0, None)
    components = int((eig < 1e-8).sum())
    return max(int(np.argmax(np.diff(eig))) + 1, components, 1)


def cluster_keys(
    keys: np.ndarray, n_clusters: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral clustering of style keys → (labels (N,), unit centroids (C, d)).

    Affinity is cosine similarity clipped at 0, squared. Without `n_clusters` the eigengap decides
    (N=1: one cluster; N=2: one if cosine ≥ 0.9). Labels are numbered by first appearance,
    so the result is deterministic for a given input order and seed.
    """
    keys = _normalize_rows(keys).astype(np.float64)
    n = len(keys)
    if keys.ndim != 2 or n == 0:
        raise ValueError(f"keys must be a non-empty (N, d) array, got shape {keys.shape}")
    if n_clusters is not None and n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    # squared clipped cosine: weak, content-level similarity fades, sibling styles stand out
    affinity = np.clip(keys @ keys.T, 0.0, 1.0) ** 2
    if n_clusters is not None:
        k = min(n_clusters, n)
    elif n <= 2:
        k = 1 if n == 1 or affinity[0, 1] >= 0.81 else 2
    else:
        k = min(_eigengap_k(affinity), n)
    if k == 1:
        raw = np.zeros(n, dtype=np.int64)
    elif k == n:
        raw = np.arange(n)
    else:
        from sklearn.cluster import SpectralClustering

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected"
            raw = SpectralClustering(
                n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=seed
            ).fit_predict(affinity)
    order = {c: i for i, c in enumerate(dict.fromkeys(raw.tolist()))}
    labels = np.array([order[c] for c in raw.tolist()], dtype=np.int64)
    centroids = np.stack([keys[labels == c].mean(axis=0) for c in range(len(order))])
    return labels, _normalize_rows(centroids)


# ---------------------------------------------------------------- reading


def _read_verified(uri: str, sha256: str, label: str) -> bytes:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise PoolCorruptError(f"{label} named by {MANIFEST} is missing ({uri})") from exc
    if _sha256(data) != sha256:
        raise PoolCorruptError(f"{label} fails its sha256 check ({uri}): corrupt or tampered")
    return data


def _read_table(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.to_pylist(), dtype=np.float32)


def _check_manifest(manifest: dict[str, Any], uri: str) -> None:
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PoolCorruptError(f"{uri}: unsupported pool format_version {version!r}")
    try:
        for name, entry in manifest["sources"].items():
            validate_name(name)
            prefix, dir_name, digest = entry["dir"].split("/")
            if (prefix, dir_name) != ("sources", name) or not _DIGEST_RE.match(digest):
                raise ValueError(f"source {name!r}: bad adapter dir {entry['dir']!r}")
            for rel in entry["files"]:
                _check_relpath(rel)
            if not {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= set(entry["files"]):
                raise ValueError(f"source {name!r}: adapter config or weights missing")
        for kind in ("keys", "clusters"):
            if not _GENERATION_FILE_RE.match(manifest["files"][kind]["path"]):
                raise ValueError(f"bad {kind} file name")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PoolCorruptError(f"{uri}/{MANIFEST} is malformed: {exc}") from exc


class Pool:
    """One committed generation of a pool (read side). Picklable: ship it to Ray tasks."""

    def __init__(
        self, uri: str, manifest: dict[str, Any], keys: pa.Table, clusters: pa.Table
    ) -> None:
        self.uri = uri
        self._manifest = manifest
        keys = keys.sort_by("source")
        clusters = clusters.sort_by("cluster")
        self._sources: list[str] = keys.column("source").to_pylist()
        if sorted(self._sources) != sorted(manifest["sources"]):
            raise PoolCorruptError(f"{uri}: keys file and {MANIFEST} list different sources")
        self._style_keys = _vectors(keys.column("key"))
        self._input_keys = _vectors(keys.column("input_key"))
        self._cluster_of = np.asarray(keys.column("cluster").to_pylist(), dtype=np.int64)
        self._cluster_keys = _vectors(clusters.column("key"))
        self._members: list[list[str]] = clusters.column("members").to_pylist()
        self._n_examples = np.asarray(keys.column("n_examples").to_pylist(), dtype=np.int64)
        self._verified: set[str] = set()

    @classmethod
    def open(cls, uri: str | Path) -> Pool:
        """Read the committed generation at `uri`, verifying the files the manifest names."""
        uri = str(uri)
        manifest_uri = storage.join(uri, MANIFEST)
        try:
            raw = storage.read_bytes(manifest_uri)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no pool at {uri} ({MANIFEST} not found)") from exc
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PoolCorruptError(f"{manifest_uri} is not valid JSON: {exc}") from exc
        _check_manifest(manifest, uri)
        tables = [
            _read_table(_read_verified(storage.join(uri, f["path"]), f["sha256"], f["path"]))
            for f in (manifest["files"]["keys"], manifest["files"]["clusters"])
        ]
        return cls(uri, manifest, *tables)

    def __repr__(self) -> str:
        return (
            f"Pool({self.uri!r}, generation={self.generation}, sources={len(self._sources)}, "
            f"clusters={len(self._cluster_keys)})"
        )

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def generation(self) -> int:
        return int(self._manifest["generation"])

    @property
    def base_model(self) -> str:
        return str(self._manifest["base_model"])

    @property
    def base_config_hash(self) -> str:
        return str(self._manifest["base_config_hash"])

    @property
    def lora_config(self) -> dict[str, Any]:
        """r, lora_alpha, target_modules, fan_in_fan_out, use_rslora shared by all sources."""
        return dict(self._manifest["lora"])

    @property
    def featurizer(self) -> str:
        return str(self._manifest["featurizer"])

    @property
    def sources(self) -> list[str]:
        """Source names, sorted; row i of every per-source array belongs to sources[i]."""
        return list(self._sources)

    @property
    def style_keys(self) -> np.ndarray:
        return self._style_keys

    @property
    def input_keys(self) -> np.ndarray:
        """Weight keys k_s for instance-level retrieval (N, d)."""
        return self._input_keys

    @property
    def n_examples(self) -> np.ndarray:
        return self._n_examples

    @property
    def cluster_of(self) -> np.ndarray:
        return self._cluster_of

    @property
    def cluster_keys(self) -> np.ndarray:
        return self._cluster_keys

    @property
    def cluster_members(self) -> list[list[str]]:
        return [list(m) for m in self._members]

    def source_cluster_keys(self) -> np.ndarray:
        """k_c(s): each source's cluster key (N, d), for task-level retrieval."""
        return self._cluster_keys[self._cluster_of]

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return dict(self._manifest["sources"][name])
        except KeyError:
            raise KeyError(f"no source {name!r} in pool {self.uri}; have {self._sources}") from None

    def _read_source_file(self, name: str, rel: str) -> bytes:
        entry = self._entry(name)
        uri = storage.join(self.uri, entry["dir"], rel)
        return _read_verified(uri, entry["files"][rel], f"{entry['dir']}/{rel}")

    def adapter_dir(self, name: str, local_cache_dir: str | Path | None = None) -> str:
        """Local path of a verified copy of source `name`'s PEFT adapter dir.

        A local pool is verified in place and its own directory returned (unless a cache dir
        is given); remote pools are downloaded once into a content-addressed cache.
        """
        entry = self._entry(name)
        fs, root = storage.resolve(self.uri)
        if isinstance(fs, pafs.LocalFileSystem) and local_cache_dir is None:
            if name not in self._verified:
                for rel in entry["files"]:
                    self._read_source_file(name, rel)
                self._verified.add(name)
            return str(Path(root) / entry["dir"])
        cache = Path(local_cache_dir or Path(tempfile.gettempdir()) / "ray_twist" / "adapters")
        target = cache / entry["dir"].split("/", 1)[1]
        if _local_copy_ok(target, entry["files"]):
            return str(target)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        for rel in entry["files"]:
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self._read_source_file(name, rel))
        if target.exists() and not _local_copy_ok(target, entry["files"]):
            shutil.rmtree(target, ignore_errors=True)  # a stale or corrupt copy
        try:
            os.replace(tmp, target)
        except OSError:  # a concurrent download finished first
            shutil.rmtree(tmp, ignore_errors=True)
            if not _local_copy_ok(target, entry["files"]):
                raise
        return str(target)

    def load_factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """PEFT module path → (A (r×d_in), B (d_out×r)) with ΔW = B·A, scaling folded into B.

        Factors are in nn.Linear orientation even for fan_in_fan_out (GPT-2 Conv1D) modules,
        whose stored weight is ΔWᵀ.
        """
        tensors = load_safetensors(self._read_source_file(name, ADAPTER_WEIGHTS))
        return lora_factors(tensors, self.lora_config, f"source {name!r}")


def _local_copy_ok(path: Path, files: dict[str, str]) -> bool:
    try:
        return all(_sha256((path / rel).read_bytes()) == sha for rel, sha in files.items())
    except OSError:
        return False


# ---------------------------------------------------------------- writing


@dataclass
class SourceEntry:
    """One source to add: its trained PEFT adapter dir, its task keys and bookkeeping."""

    name: str
    adapter_dir: str | Path
    key: TaskKey
    metrics: dict[str, Any] = field(default_factory=dict)
    data_hash: str = ""


@dataclass
class _Prepared:
    entry: SourceEntry
    files: dict[str, bytes]
    hashes: dict[str, str]
    dir: str  # sources/<name>/<digest of the file hashes>
    lora: dict[str, Any]


def _prepare(entry: SourceEntry) -> _Prepared:
    """Read and check an adapter dir: PEFT LoRA, safetensors only, linear LoRA layers only."""
    root = Path(entry.adapter_dir)
    if not (root / ADAPTER_CONFIG).is_file() or not (root / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{root} is not a PEFT adapter dir ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} needed)"
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
    lora = _lora_layout(json.loads(files[ADAPTER_CONFIG]), f"source {entry.name!r}")
    with safe_open(str(root / ADAPTER_WEIGHTS), framework="pt") as f:
        names = list(f.keys())
    odd = [n for n in names if not n.endswith(_LORA_SUFFIXES)]
    if odd or not names:
        raise ValueError(
            f"source {entry.name!r}: only linear LoRA A/B weights can be pooled, "
            f"found {odd[:3] or 'no tensors'}"
        )
    hashes = {rel: _sha256(data) for rel, data in files.items()}
    digest = _sha256(json.dumps(hashes, sort_keys=True).encode())[:16]
    return _Prepared(entry, files, hashes, f"sources/{entry.name}/{digest}", lora)


def _check_same(what: str, ours: Any, theirs: Any, context: str, other: str = "the pool") -> None:
    if ours != theirs:
        if isinstance(ours, dict) and isinstance(theirs, dict):  # show only what differs
            diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            ours, theirs = ({k: d.get(k) for k in diff} for d in (ours, theirs))
        raise PoolMismatchError(
            f"{what} mismatch: {context} has {ours!r} but {other} has {theirs!r}; "
            "every source of a pool must share base model, LoRA layout and featurizer"
        )


def _entry_key(key: TaskKey, name: str) -> tuple[np.ndarray, np.ndarray]:
    style, inp = np.asarray(key.style_key), np.asarray(key.input_key)
    if style.ndim != 1 or style.shape != inp.shape or not np.all(np.isfinite(style)):
        raise ValueError(f"source {name!r}: key.style_key/input_key must be finite (d,) vectors")
    return _normalize_rows(style), _normalize_rows(inp)


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
    featurizer: str = DEFAULT_FEATURIZER,
    n_clusters: int | None = None,
    seed: int = 0,
) -> Pool:
    """Add (or replace same-named) sources, re-cluster all style keys, commit one generation.

    Creates the pool if `uri` holds none. `n_clusters=None` picks the count by eigengap.
    The pool keeps the base model string it was created with.
    """
    uri = str(uri)
    if not entries:
        raise ValueError("entries is empty: nothing to add")
    names = [validate_name(e.name) for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate source names in entries: {names}")
    prepared = [_prepare(e) for e in entries]
    for p in prepared[1:]:
        first = f"source {prepared[0].entry.name!r}"
        _check_same("LoRA layout", p.lora, prepared[0].lora, f"source {p.entry.name!r}", first)
    new_keys = {p.entry.name: _entry_key(p.entry.key, p.entry.name) for p in prepared}
    dims = {k[0].shape[0] for k in new_keys.values()}
    if len(dims) != 1:
        raise ValueError(f"entries have keys of different dimensions: {sorted(dims)}")
    base_hash = config_hash(base_model)
    manifest_uri = storage.join(uri, MANIFEST)
    previous = Pool.open(uri) if storage.exists(manifest_uri) else None
    keys: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    old: dict[str, Any] = {"sources": {}}
    if previous is not None:
        context = f"base model {base_model!r}"
        _check_same("base model config hash", base_hash, previous.base_config_hash, context)
        _check_same("LoRA layout", prepared[0].lora, previous.lora_config, "the new adapters")
        _check_same("featurizer", featurizer, previous.featurizer, "the new sources")
        _check_same("key dimension", dims.pop(), previous.style_keys.shape[1], "the new keys")
        old = previous.manifest
        keys = {
            n: (previous.style_keys[i], previous.input_keys[i])
            for i, n in enumerate(previous.sources)
        }
    keys.update(new_keys)

    sources = dict(old["sources"])
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
        }
    names = sorted(sources)
    n_examples = [sources[n]["n_examples"] for n in names]
    keys_table, clusters_table = _tables(names, keys, n_examples, n_clusters, seed)
    generation = previous.generation + 1 if previous else 1
    files = {}
    for kind, table in (("keys", keys_table), ("clusters", clusters_table)):
        data = _table_bytes(table)
        path = f"{kind}.g{generation:06d}.parquet"
        storage.write_bytes_atomic(storage.join(uri, path), data)
        files[kind] = {"path": path, "sha256": _sha256(data)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "base_model": previous.base_model if previous else base_model,
        "base_config_hash": base_hash,
        "lora": prepared[0].lora,
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
    }
    blob = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default).encode()
    if previous and json.loads(storage.read_bytes(manifest_uri))["generation"] != generation - 1:
        raise PoolConflictError(f"{uri} was committed by another writer meanwhile; retry the add")
    storage.write_bytes_atomic(manifest_uri, blob)  # the commit
    _collect_garbage(uri, [manifest, old])
    return Pool(uri, json.loads(blob), keys_table, clusters_table)


def _collect_garbage(uri: str, keep: list[dict[str, Any]]) -> None:
    """Best effort: delete data files named by neither manifest in `keep`."""
    named_files = {f["path"] for m in keep for f in m.get("files", {}).values()}
    named_dirs = {e["dir"] for m in keep for e in m["sources"].values()}
    fs, root = storage.resolve(uri)

    def listing(path: str) -> list[pafs.FileInfo]:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    try:
        for info in listing(root):
            if _GENERATION_FILE_RE.match(info.base_name) and info.base_name not in named_files:
                fs.delete_file(info.path)
        for name_dir in listing(f"{root}/sources"):
            for version in listing(name_dir.path):
                if f"sources/{name_dir.base_name}/{version.base_name}" not in named_dirs:
                    fs.delete_dir(version.path)
            if not listing(name_dir.path):
                fs.delete_dir(name_dir.path)
    except OSError as exc:
        log.warning("pool %s: garbage collection skipped: %s", uri, exc)
