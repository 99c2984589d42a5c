"""Reading a committed pool generation: manifest, keys, verified adapters and factors.

The newest generation is the highest of `manifests/g*.json` and `pool.json` (a writer killed
between its commit and its `pool.json` copy leaves that copy one behind). A `Pool` stays on the
generation it opened; when a file it names has been garbage-collected because newer
generations exist, reads raise `PoolGenerationGoneError` and the caller reopens the pool.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from ray_twist import storage
from ray_twist.lora.peft_io import load_weights, lora_factors, read_config
from ray_twist.pool.format import (
    _MANIFEST_FILE_RE,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    MANIFESTS,
    PoolCorruptError,
    PoolGenerationGoneError,
    _check_manifest,
    _lora_layout,
    _read_table,
    _read_verified,
    _sha256,
    _vectors,
    manifest_name,
)


def committed_generations(uri: str) -> list[int]:
    """Generations with a manifest under `manifests/`, ascending (empty for a pool written
    before format 2, which has only `pool.json`)."""
    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{MANIFESTS}", allow_not_found=True))
    return sorted(int(m[1]) for i in infos if (m := _MANIFEST_FILE_RE.match(i.base_name)))


def read_manifest(uri: str, path: str) -> dict[str, Any] | None:
    """The checked manifest at `path` under the pool URI, None if there is none."""
    where = storage.join(uri, path)
    try:
        raw = storage.read_bytes(where)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PoolCorruptError(f"{where} is not valid JSON: {exc}") from exc
    _check_manifest(manifest, where)
    return dict(manifest)


def newest_manifest(uri: str) -> dict[str, Any] | None:
    """The newest committed generation's manifest (None: no pool at `uri`)."""
    pointer = read_manifest(uri, MANIFEST)
    generations = committed_generations(uri)
    if generations and (pointer is None or generations[-1] > pointer["generation"]):
        return read_manifest(uri, manifest_name(generations[-1])) or pointer
    return pointer


def _generation_manifest(uri: str, generation: int) -> dict[str, Any]:
    manifest = read_manifest(uri, manifest_name(generation))
    if manifest is None:  # a pool of format 1 has only pool.json
        pointer = read_manifest(uri, MANIFEST)
        if pointer is not None and pointer["generation"] == generation:
            manifest = pointer
    if manifest is None:
        newest = newest_manifest(uri)
        if newest is None or newest["generation"] < generation:
            raise FileNotFoundError(f"pool {uri} has no generation {generation}")
        raise PoolGenerationGoneError(uri, generation, newest["generation"])
    if manifest["generation"] != generation:
        raise PoolCorruptError(f"{uri}/{manifest_name(generation)} holds another generation")
    return manifest


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
    def open(cls, uri: str | Path, generation: int | None = None) -> Pool:
        """Read the newest committed generation at `uri` (or `generation`, while garbage
        collection keeps it), verifying the files the manifest names.

        A local path is kept absolute (`Pool.uri`), so it still names the pool in Ray tasks
        and workers, which run in other directories."""
        uri = storage.absolute(uri)
        if generation is not None:
            manifest = _generation_manifest(uri, generation)
        elif (newest := newest_manifest(uri)) is not None:
            manifest = newest
        else:
            raise FileNotFoundError(f"no pool at {uri} ({MANIFEST} not found)")
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
        """What the sources share: fan_in_fan_out, and target_modules, the union of the names
        of the modules they train (format 1 pools: the one layout of every source, with its
        r, lora_alpha and use_rslora). Each source's own layout: `source_layout`."""
        return dict(self._manifest["lora"])

    def source_layout(self, name: str) -> dict[str, Any]:
        """Source `name`'s LoRA layout: r, lora_alpha, use_rslora, rank/alpha patterns,
        target_modules, fan_in_fan_out and module_names (format 1 pools: read from its files)."""
        layout = self._entry(name).get("lora")
        if layout is None:
            weights = load_weights(self._read_source_file(name, ADAPTER_WEIGHTS), name)
            layout = _lora_layout(self.source_config(name), weights, f"source {name!r}")
        return dict(layout)

    def source_config(self, name: str) -> dict[str, Any]:
        """Source `name`'s own adapter_config.json (verified): its scaling is read from it."""
        data = self._read_source_file(name, ADAPTER_CONFIG)
        return read_config(data, f"{self._entry(name)['dir']}/{ADAPTER_CONFIG}")

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
        """A verified adapter file; a missing one raises `PoolGenerationGoneError` where newer
        generations exist (collected, not corrupt), else `PoolCorruptError`."""
        entry = self._entry(name)
        uri = storage.join(self.uri, entry["dir"], rel)
        try:
            return _read_verified(uri, entry["files"][rel], f"{entry['dir']}/{rel}")
        except PoolCorruptError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                newest = newest_manifest(self.uri)
                if newest is not None and newest["generation"] != self.generation:
                    raise PoolGenerationGoneError(
                        self.uri, self.generation, newest["generation"]
                    ) from exc
            raise

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
        """PEFT module path → (A (r×d_in), B (d_out×r)) with ΔW = B·A, the source's own
        scaling (its r, α, rsLoRA and patterns, per module) folded into B.

        Factors are in nn.Linear orientation even for fan_in_fan_out (GPT-2 Conv1D) modules,
        whose stored weight is ΔWᵀ.
        """
        where = f"{self._entry(name)['dir']}/{ADAPTER_WEIGHTS}"
        tensors = load_weights(self._read_source_file(name, ADAPTER_WEIGHTS), where)
        return lora_factors(tensors, self.source_config(name), f"source {name!r}")


def _local_copy_ok(path: Path, files: dict[str, str]) -> bool:
    try:
        return all(_sha256((path / rel).read_bytes()) == sha for rel, sha in files.items())
    except OSError:
        return False
