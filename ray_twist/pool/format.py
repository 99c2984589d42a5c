"""Pool format: file names, manifest checks, checksums, names, errors (shared by readers
and writers)."""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor

from ray_twist import storage
from ray_twist.lora.peft_io import AdapterFormatError, check_lora

#: 2: per-generation manifests (`manifests/g<N>.json`, the commit point), content-named keys and
#: clusters files, and each source's own LoRA layout (`_lora_layout`; sources may differ in r,
#: α, rsLoRA, patterns and target modules) with the pool-level "lora" holding only what they
#: share (fan_in_fan_out) and the union of their module names. 1: one manifest `pool.json`,
#: generation-named files and one layout for every source in the pool-level "lora"; still read.
FORMAT_VERSION = 2
MANIFEST = "pool.json"
MANIFESTS = "manifests"
KEEP_GENERATIONS = 3
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{16}$")
_GENERATION_FILE_RE = re.compile(r"^(keys|clusters)\.g\d{6}(\.[0-9a-f]{16})?\.parquet$")
_MANIFEST_FILE_RE = re.compile(r"^g(\d{6,})\.json$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_A_SUFFIX = ".lora_A.weight"

log = logging.getLogger(__name__)


class PoolCorruptError(RuntimeError):
    """A file pool.json names is missing, fails its sha256, or the manifest is malformed."""


class PoolMismatchError(ValueError):
    """Adapters that cannot share a pool: different base model, LoRA layout or featurizer."""


class PoolConflictError(RuntimeError):
    """Another writer committed a new generation while this write was in progress."""


class PoolGenerationGoneError(RuntimeError):
    """A file an opened generation names is gone because newer generations were committed and
    garbage collection dropped it: reopen the pool (`Pool.open`) and redo the work on it."""

    def __init__(self, uri: str, generation: int, newest: int | None) -> None:
        super().__init__(
            f"pool {uri}: generation {generation} is gone (garbage-collected; the newest is "
            f"{newest}); reopen the pool"
        )
        self.uri, self.generation, self.newest = uri, generation, newest


def manifest_name(generation: int) -> str:
    """Path of a generation's manifest (its commit point) under the pool URI."""
    return f"{MANIFESTS}/g{generation:06d}.json"


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


def _check_relpath(rel: str) -> str:
    parts = rel.split("/")
    if not all(_NAME_RE.match(p) and ".." not in p for p in parts):
        raise ValueError(f"invalid adapter file name {rel!r}")
    if rel.lower().endswith(_PICKLE_SUFFIXES):
        raise ValueError(f"adapter file {rel!r} is a pickle-based format; safetensors only")
    return rel


def _lora_layout(cfg: dict[str, Any], tensors: dict[str, Tensor], where: str) -> dict[str, Any]:
    """A source's LoRA layout, as the manifest records it, from its adapter_config.json and
    weights; refuses (naming `where`) what TWIST can't merge (`check_lora`). Sources may
    differ in all of it except fan_in_fan_out, which the base model's layer type decides."""
    check_lora(cfg, tensors, where)
    try:
        targets = cfg.get("target_modules")
        return {
            "r": int(cfg["r"]),
            "lora_alpha": float(cfg["lora_alpha"]),
            "use_rslora": bool(cfg.get("use_rslora", False)),
            "rank_pattern": dict(cfg.get("rank_pattern") or {}),
            "alpha_pattern": dict(cfg.get("alpha_pattern") or {}),
            "target_modules": sorted(targets) if isinstance(targets, list | tuple) else targets,
            "fan_in_fan_out": bool(cfg.get("fan_in_fan_out", False)),
            "module_names": sorted(
                {k[: -len(_A_SUFFIX)].rsplit(".", 1)[-1] for k in tensors if k.endswith(_A_SUFFIX)}
            ),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{where}: {ADAPTER_CONFIG} field {exc} missing or bad") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


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


def _check_manifest(manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest (at URI `where`) this version cannot read safely."""
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PoolCorruptError(f"{where}: unsupported pool format_version {version!r}")
    try:
        if not isinstance(manifest["generation"], int) or manifest["generation"] < 1:
            raise ValueError(f"bad generation {manifest['generation']!r}")
        for name, entry in manifest["sources"].items():
            validate_name(name)
            prefix, dir_name, digest = entry["dir"].split("/")
            if (prefix, dir_name) != ("sources", name) or not _DIGEST_RE.match(digest):
                raise ValueError(f"source {name!r}: bad adapter dir {entry['dir']!r}")
            for rel in entry["files"]:
                _check_relpath(rel)
            if not {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= set(entry["files"]):
                raise ValueError(f"source {name!r}: adapter config or weights missing")
            if version >= 2 and not isinstance(entry["lora"], dict):
                raise ValueError(f"source {name!r}: no LoRA layout")
        for kind in ("keys", "clusters"):
            if not _GENERATION_FILE_RE.match(manifest["files"][kind]["path"]):
                raise ValueError(f"bad {kind} file name")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PoolCorruptError(f"{where} is malformed: {exc}") from exc
