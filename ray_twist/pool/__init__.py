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
share one base model (config hash) and one featurizer (`PoolMismatchError`); their LoRA
layouts may differ (r, α, rsLoRA, rank/alpha patterns, target modules: each source's is
recorded in the manifest and its own scaling folded in when its factors are read), but not
what cannot be merged as ΔW = B·A on linear layers (DoRA, embedding or conv LoRA: refused). Keys: `key` is the style key (clustering, task-level retrieval),
`input_key` the input key (instance-level retrieval); see `ray_twist.features`.
"""

from ray_twist.pool.clustering import cluster_keys
from ray_twist.pool.factors import pool_merge_sources
from ray_twist.pool.format import (
    FORMAT_VERSION,
    MANIFEST,
    PoolConflictError,
    PoolCorruptError,
    PoolMismatchError,
    validate_name,
)
from ray_twist.pool.reader import Pool
from ray_twist.pool.writer import SourceEntry, add_sources

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "Pool",
    "PoolConflictError",
    "PoolCorruptError",
    "PoolMismatchError",
    "SourceEntry",
    "add_sources",
    "cluster_keys",
    "pool_merge_sources",
    "validate_name",
]
