"""A pool's sources as one `MergeSources` factor stack, cached per pool generation."""

from __future__ import annotations

import torch

from ray_twist.lora.peft_io import AdapterFactors
from ray_twist.merge.sources import MergeSources
from ray_twist.pool.reader import Pool

__all__ = ["pool_merge_sources"]

_SOURCES_CACHE: dict[tuple[str, int, str, str], MergeSources] = {}


def pool_merge_sources(
    pool: Pool, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> MergeSources:
    """The pool's sources as a MergeSources, cached per pool generation (QR factors included)."""
    cache_key = (pool.uri, pool.generation, str(device), str(dtype))
    if cache_key not in _SOURCES_CACHE:
        adapters = [
            AdapterFactors(
                {**pool.source_config(name), "base_model_name_or_path": pool.base_model},
                pool.load_factors(name),
            )
            for name in pool.sources
        ]
        _SOURCES_CACHE.clear()  # one pool generation at a time keeps memory bounded
        _SOURCES_CACHE[cache_key] = MergeSources(pool.sources, adapters, device, dtype)
    return _SOURCES_CACHE[cache_key]
