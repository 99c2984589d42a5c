"""Merging LoRA factors. The public API is `MergeSources`, a set of sources as one factor
stack: `merge` (one adapter per target) and `rows` (per-row factors to generate with), over
the factored SVD merge of `ray_twist.merge.factored` (batched, CPU/GPU, both merge orders;
`merge_lora_factors` for one module's factors; `SubsetStack` for top-k targets). Adapter I/O is in `ray_twist.lora`."""

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
from ray_twist.merge.subset import SubsetStack

__all__ = [
    "DEFAULT_MERGE_ORDER",
    "MERGE_METHODS",
    "MERGE_ORDERS",
    "MergeSources",
    "ModuleFactors",
    "FactorStack",
    "MergeMethod",
    "MergeOrder",
    "SubsetStack",
    "TruncatedStack",
    "dense_svd_merge",
    "merge_lora_factors",
    "truncate_factors",
]
