"""Merging LoRA factors: the factored SVD merge (batched, CPU/GPU, both merge orders), a pool's
sources as one factor stack, and per-row mixtures. Adapter I/O is in `ray_twist.lora`."""

from ray_twist.merge.factored import (
    DEFAULT_MERGE_ORDER,
    MERGE_METHODS,
    MERGE_ORDERS,
    FactorStack,
    MergeMethod,
    MergeOrder,
    TruncatedStack,
    dense_svd_merge,
    merge_lora_factors,
    truncate_factors,
)
from ray_twist.merge.sources import MergeSources, ModuleFactors

__all__ = [
    "DEFAULT_MERGE_ORDER",
    "MERGE_METHODS",
    "MERGE_ORDERS",
    "MergeSources",
    "ModuleFactors",
    "FactorStack",
    "MergeMethod",
    "MergeOrder",
    "TruncatedStack",
    "dense_svd_merge",
    "merge_lora_factors",
    "truncate_factors",
]
