"""The weight pool: source LoRAs with their keys, on a local directory or an object store.

Layout under the pool URI (local path, file://, s3://, gs:// — all through pyarrow.fs)::

    manifests/g000003.json         generation 3's manifest; creating it is the commit
    pool.json                      a copy of the newest manifest (tools, format-1 readers)
    keys.g000003.<digest>.parquet  source, cluster, key, input_key, n_examples
    clusters.g000003.<digest>.parquet  cluster, key, members
    sources/<name>/<digest>/       a PEFT adapter dir (adapter_config.json +
                                   adapter_model.safetensors); digest = content hash

This refines DESIGN.md's fixed names (`keys.parquet`, `clusters.parquet`,
`sources/<name>/`): data files are named by generation and content, so no writer ever
overwrites a file another writer wrote. Two writers may share a pool: a writer reads the
newest generation N, writes every new file, then commits by creating `manifests/g<N+1>.json`
exclusively (a hard link locally; a PUT with `If-None-Match: *` on S3); the one that loses
gets `PoolConflictError` and can retry. A write killed at any point leaves the previous
generation intact and readable; one killed after its commit but before the `pool.json` copy
is still the newest, since readers and writers take the highest of `manifests/` and
`pool.json`. (gs:// has no conditional create through pyarrow: there the commit checks and
then writes, which does not exclude a concurrent writer.) Pools written before this layout
(only `pool.json`, format 1) open unchanged and take the new layout at their next commit.

After a commit, garbage collection deletes what the newest K generations (`keep_generations`,
default 3, recorded in the manifest) do not name, sparing files younger than an hour (a
concurrent writer's, not yet committed). A reader of a generation that has since been
collected gets `PoolGenerationGoneError` and reopens the pool (the Serve engine does so by
itself); `Pool.open(uri, generation=N)` reopens a still-kept older generation.

Readers read only what the newest manifest names and check each file's sha256
(`PoolCorruptError` names the file). Only safetensors weights are accepted. All sources
share one base model (config hash) and one featurizer (`PoolMismatchError`); their LoRA
layouts may differ (r, α, rsLoRA, rank/alpha patterns, target modules: each source's is
recorded in the manifest and its own scaling folded in when its factors are read), but not
what cannot be merged as ΔW = B·A on linear layers (DoRA, embedding or conv LoRA: refused).
Keys: `key` is the style key (clustering, task-level retrieval), `input_key` the input key
(instance-level retrieval); see `ray_twist.features`.
"""

from ray_twist.pool.clustering import cluster_keys
from ray_twist.pool.factors import pool_merge_sources
from ray_twist.pool.format import (
    FORMAT_VERSION,
    KEEP_GENERATIONS,
    MANIFEST,
    PoolConflictError,
    PoolCorruptError,
    PoolGenerationGoneError,
    PoolMismatchError,
    validate_name,
)
from ray_twist.pool.reader import Pool
from ray_twist.pool.writer import SourceEntry, add_sources

__all__ = [
    "FORMAT_VERSION",
    "KEEP_GENERATIONS",
    "MANIFEST",
    "Pool",
    "PoolConflictError",
    "PoolCorruptError",
    "PoolGenerationGoneError",
    "PoolMismatchError",
    "SourceEntry",
    "add_sources",
    "cluster_keys",
    "pool_merge_sources",
    "validate_name",
]
