"""Retrieval scores R_s: how much of each source LoRA a target (task or sentence) gets.

    R_s = softmax_s( ( λ·cos(q_t, k_c(s)) + (1−λ)·cos(q_x, k_s) ) / τ )   over the top-k

q_t is a style query compared with the source's cluster key k_c(s) (task level); q_x an
input query compared with the source's input key k_s (instance level: one sentence in
serving, or a target task's mean input embedding). Sources outside a row's top-k get 0.
Everything is batched over rows: T targets or T sentences at once.

The two levels live in different spaces. Cluster keys are centroids of style *shift*
vectors (mean(targets) − mean(sources) of a source's data, `ray_twist.features`); input
keys are mean embeddings of what a source is applied to. So q_t must be a shift too: a
target task's style key (init, merge), or a named style's key (a pool source's, or a
registered style's from its examples) in serving and bulk restyling. One sentence on its
own has no shift, so **a sentence without a style is retrieved at the instance level
only: λ is applied as 0** (`applied_lambda`), whatever λ is configured. Comparing the
sentence's embedding with cluster keys, as if it were a shift, would mix the spaces. The
serve response (`retrieval_applied`) and a bulk restyle's records (`retrieval_applied` in
`_summary.json`) say which λ and levels applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from ray_twist.merge.factored import DEFAULT_MERGE_ORDER, MergeOrder
from ray_twist.settings import Settings
from ray_twist.vectors import unit_rows


class KeyedSources(Protocol):
    """What retrieval reads of a pool (`ray_twist.pool.Pool` is one): the sources in column
    order, each source's cluster key and its input key."""

    @property
    def sources(self) -> Sequence[str]: ...

    @property
    def input_keys(self) -> np.ndarray: ...

    def source_cluster_keys(self) -> np.ndarray: ...


class TaskKeys(Protocol):
    """A task's key vectors and size (`ray_twist.features.TaskKey` is one)."""

    style_key: np.ndarray
    input_key: np.ndarray
    n_examples: int


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
        q_t = unit_rows(_matrix(task_queries, "task_queries", d), np.float64)
        scores = scores + lam * (q_t @ unit_rows(k_c, np.float64).T)
    if lam < 1:
        q_x = unit_rows(_matrix(instance_queries, "instance_queries", d), np.float64)
        if len(scores) > 1 and len(q_x) > 1 and len(q_x) != len(scores):
            raise ValueError(
                f"task_queries has {len(scores)} rows but instance_queries has {len(q_x)}"
            )
        scores = scores + (1 - lam) * (q_x @ unit_rows(k_s, np.float64).T)
    scores /= tau
    k = n if top_k is None else min(int(top_k), n)
    keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(scores, keep, axis=1)
    weights = np.exp(kept - kept.max(axis=1, keepdims=True))
    out = np.zeros_like(scores)
    np.put_along_axis(out, keep, weights / weights.sum(axis=1, keepdims=True), axis=1)
    return out


def applied_lambda(lam: float, has_style_query: bool) -> float:
    """λ as applied to a row: the configured λ with a style query, 0 (the instance level
    alone) without one — a sentence alone gives no style shift to compare with cluster keys."""
    return lam if has_style_query else 0.0


def levels(lam: float) -> list[str]:
    """The levels an applied λ uses: "task" (λ > 0) and/or "instance" (λ < 1)."""
    return [name for name, used in (("task", lam > 0), ("instance", lam < 1)) if used]


def applied_retrieval(settings: RetrievalSettings, has_style_query: bool) -> dict[str, Any]:
    """What a row's weights were computed with: the applied λ, its levels, τ and top-k."""
    lam = applied_lambda(settings.lam, has_style_query)
    return {"lambda": lam, "levels": levels(lam), "tau": settings.tau, "top_k": settings.top_k}


def task_retrieval(
    pool: KeyedSources, key: TaskKeys, lam: float = 0.5, tau: float = 0.1, top_k: int | None = None
) -> dict[str, float]:
    """Source name → R_s for one target task (q_t = its style key, q_x = its input key)."""
    scores = retrieval_scores(
        key.style_key, key.input_key, pool.source_cluster_keys(), pool.input_keys, lam, tau, top_k
    )
    return {name: float(w) for name, w in zip(pool.sources, scores[0], strict=True)}


def instance_retrieval(
    pool: KeyedSources,
    input_embeddings: np.ndarray,
    lam: float = 0.5,
    tau: float = 0.1,
    top_k: int | None = None,
    style_query: np.ndarray | None = None,
) -> np.ndarray:
    """(T, N) scores for T input sentences, columns in `pool.sources` order.

    `style_query` ((d,) or (T, d)) is the wanted style's key (a style shift) for the
    task-level term; without one there is no task-level query and each sentence is scored
    at the instance level alone (λ applied as 0, see `applied_lambda`).
    """
    inputs = _matrix(input_embeddings, "input_embeddings")
    task = None
    if style_query is not None:
        task = _matrix(style_query, "style_query", inputs.shape[1])
        if len(task) == 1:
            task = np.broadcast_to(task, inputs.shape)
    lam = applied_lambda(lam, style_query is not None)
    return retrieval_scores(
        task, inputs, pool.source_cluster_keys(), pool.input_keys, lam, tau, top_k
    )


# ---------------------------------------------------------------- settings

DEFAULT_KEY_EXAMPLES = 1000
# Settings added after run names and resume records were first written, with their defaults.
_LATER_DEFAULTS: dict[str, Any] = {
    "merge_order": DEFAULT_MERGE_ORDER,
    "key_examples": DEFAULT_KEY_EXAMPLES,
}


class RetrievalSettings(Settings):
    """R_s = softmax((λ·cos(q_t, k_c) + (1−λ)·cos(q_x, k_s)) / τ) over the top-k sources,
    and the order (`merge_order`) in which the R_s-weighted merge truncates to rank q.

    `merge_order` lives here because these settings reach every merge (adapt, init/merge,
    merge_targets, serving, bulk restyle, the study); `key_examples` because a target task's
    key is the task-level query. Dumps leave out these later settings while they hold their
    defaults, so run names, hashes and resume records written before them stay valid.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)

    lam: float = Field(default=0.5, ge=0.0, le=1.0, alias="lambda",
                       description="1 = task level (cluster keys) only, 0 = instance level only")  # fmt: skip
    tau: float = Field(default=0.1, gt=0.0, description="softmax temperature")
    top_k: int | None = Field(default=None, ge=1, description="keep the k best sources")
    merge_order: MergeOrder = Field(
        default=DEFAULT_MERGE_ORDER,
        description="sum_then_truncate: top-q SVD of Σ R_s ΔW_s (rank q); truncate_then_sum: "
        "Σ R_s·top-q SVD(ΔW_s), stored exactly (rank Σ min(q, r_s) over sources with R_s ≠ 0)",
    )
    key_examples: int | None = Field(
        default=DEFAULT_KEY_EXAMPLES,
        ge=1,
        description="a target task is keyed on a seeded sample of at most this many examples "
        "(None: all); keying 28k pairs on one core takes ~15 min, 1000 under a minute. Pool "
        "sources are keyed on all their (already capped) data by the pool build",
    )

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if isinstance(data, dict):
            for name, default in _LATER_DEFAULTS.items():
                if name in data and data[name] == default:
                    del data[name]
        return data


class InstanceRetrievalSettings(RetrievalSettings):
    """Per-sentence retrieval (instance and mixture modes) and the instance-mode merge rank;
    serving (`retrieval:` of a serve config) and bulk restyling share it."""

    rank: int = Field(default=8, ge=1, description="rank q of the truncated SVD merge")
