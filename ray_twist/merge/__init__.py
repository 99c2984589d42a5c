"""Factored SVD merge of LoRA factors (batched, CPU/GPU) and PEFT adapter interop."""

from ray_twist.merge.factored import (
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
from ray_twist.merge.peft_io import AdapterFactors, AdapterFormatError, read_adapter, write_adapter
from ray_twist.merge.sources import MergeSources, ModuleFactors

__all__ = [
    "AdapterFactors",
    "AdapterFormatError",
    "read_adapter",
    "write_adapter",
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
