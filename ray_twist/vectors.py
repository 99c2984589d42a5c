"""Vector helpers shared by the featurizer, retrieval and the pool (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["unit_rows"]


def unit_rows(x: Any, dtype: Any = np.float32) -> np.ndarray:
    """Each row (the last axis) scaled to unit L2 norm; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(dtype)
