"""Retrieval scores R_s: how much of each source LoRA a target (task or sentence) gets.

    R_s = softmax_s( ( λ·cos(q_t, k_c(s)) + (1−λ)·cos(q_x, k_s) ) / τ )   over the top-k

q_t is a style query compared with the source's cluster key k_c(s) (task level); q_x an
input query compared with the source's input key k_s (instance level: one sentence in
serving, or a target task's mean input embedding). Sources outside a row's top-k get 0.
Everything is batched over rows: T targets or T sentences at once.
"""

from __future__ import annotations

import numpy as np

from ray_twist.features import TaskKey
from ray_twist.pool import Pool


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _matrix(x: np.ndarray | None, name: str, dim: int | None = None) -> np.ndarray:
    """A finite 2-D float64 array; a single vector counts as one row."""
    if x is None:
        raise ValueError(f"{name} is required for this lam")
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or (dim is not None and arr.shape[1] != dim):
        want = f"(rows, {dim})" if dim is not None else "(rows, d)"
        raise ValueError(f"{name} must have shape {want}, got {np.shape(x)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def retrieval_scores(
    task_queries: np.ndarray | None,
    instance_queries: np.ndarray | None,
    cluster_keys_per_source: np.ndarray,
    weight_keys: np.ndarray,
    lam: float = 0.5,
    tau: float = 0.1,
    top_k: int | None = None,
) -> np.ndarray:
    """(T, N) retrieval weights: each row sums to 1 over its top-k sources, 0 elsewhere.

    λ=1 uses only `task_queries` (instance queries may be None) and λ=0 only
    `instance_queries`. A single-row query of either kind is broadcast against the other.
    Ties at the top-k boundary go to the lower source index, so results are deterministic.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    k_c = _matrix(cluster_keys_per_source, "cluster_keys_per_source")
    n, d = k_c.shape
    k_s = _matrix(weight_keys, "weight_keys", d)
    if k_s.shape[0] != n:
        raise ValueError(f"weight_keys has {k_s.shape[0]} rows but there are {n} sources")
    scores = np.zeros((1, n))
    if lam > 0:
        q_t = _unit(_matrix(task_queries, "task_queries", d))
        scores = scores + lam * (q_t @ _unit(k_c).T)
    if lam < 1:
        q_x = _unit(_matrix(instance_queries, "instance_queries", d))
        if len(scores) > 1 and len(q_x) > 1 and len(q_x) != len(scores):
            raise ValueError(
                f"task_queries has {len(scores)} rows but instance_queries has {len(q_x)}"
            )
        scores = scores + (1 - lam) * (q_x @ _unit(k_s).T)
    scores /= tau
    k = n if top_k is None else min(int(top_k), n)
    keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(scores, keep, axis=1)
    weights = np.exp(kept - kept.max(axis=1, keepdims=True))
    out = np.zeros_like(scores)
    np.put_along_axis(out, keep, weights / weights.sum(axis=1, keepdims=True), axis=1)
    return out


def task_retrieval(
    pool: Pool, key: TaskKey, lam: float = 0.5, tau: float = 0.1, top_k: int | None = None
) -> dict[str, float]:
    """Source name → R_s for one target task (q_t = its style key, q_x = its input key)."""
    scores = retrieval_scores(
        key.style_key, key.input_key, pool.source_cluster_keys(), pool.input_keys, lam, tau, top_k
    )
    return {name: float(w) for name, w in zip(pool.sources, scores[0], strict=True)}


def instance_retrieval(
    pool: Pool,
    input_embeddings: np.ndarray,
    lam: float = 0.5,
    tau: float = 0.1,
    top_k: int | None = None,
    style_query: np.ndarray | None = None,
) -> np.ndarray:
    """(T, N) scores for T input sentences, columns in `pool.sources` order.

    `style_query` ((d,) or (T, d)) is the wanted style's key for the task-level term;
    without one, each sentence is its own query at both levels.
    """
    inputs = _matrix(input_embeddings, "input_embeddings")
    task = inputs if style_query is None else _matrix(style_query, "style_query", inputs.shape[1])
    if len(task) == 1:
        task = np.broadcast_to(task, inputs.shape)
    return retrieval_scores(
        task, inputs, pool.source_cluster_keys(), pool.input_keys, lam, tau, top_k
    )
