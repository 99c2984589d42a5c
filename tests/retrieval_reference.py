"""The retrieval formula written again in plain numpy, for tests to check every path against.

    R_s = softmax_s( ( λ·cos(q_t, k_c(s)) + (1−λ)·cos(q_x, k_s) ) / τ )   over the top-k

Deliberately independent of `ray_twist.retrieval` (and of `ray_twist.features.task_key`):
keys are read from the pool's arrays, queries are built here from the featurizer's
embeddings. `wrong_formulas` are the mistakes a test must be able to tell apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ray_twist.features import Featurizer
from ray_twist.pool import Pool

TOL = 1e-4  # float32 embeddings on another process/thread count: ~1e-6 on the weights


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def shift_key(featurizer: Featurizer, sources: Sequence[str], targets: Sequence[str]):
    """A style query: unit(mean(unit targets) − mean(unit sources))."""
    emb_s, emb_t = unit(featurizer.encode(list(sources))), unit(featurizer.encode(list(targets)))
    return unit(emb_t.mean(axis=0) - emb_s.mean(axis=0))


def mean_key(featurizer: Featurizer, texts: Sequence[str]) -> np.ndarray:
    """An input key: unit(mean(unit embeddings))."""
    return unit(unit(featurizer.encode(list(texts))).mean(axis=0))


def expected(
    pool: Pool,
    task_query: np.ndarray | None,
    instance_queries: np.ndarray,
    lam: float,
    tau: float,
    top_k: int | None,
    *,
    cluster_side: str = "cluster",
    instance_side: str = "input",
) -> np.ndarray:
    """(T, N) weights; `task_query` (d,) or None (no task-level term). The *_side arguments
    pick which pool keys each level compares with (to build wrong formulas)."""
    keys = {"cluster": pool.cluster_keys[pool.cluster_of], "input": pool.input_keys}
    q_x = unit(np.atleast_2d(instance_queries))
    logits = (1 - lam) * q_x @ unit(keys[instance_side]).T
    if task_query is not None:
        logits = logits + lam * unit(np.atleast_2d(task_query)) @ unit(keys[cluster_side]).T
    logits = logits / tau
    k = logits.shape[1] if top_k is None else min(top_k, logits.shape[1])
    out = np.zeros_like(logits)
    for row, scores in zip(out, logits, strict=True):
        keep = np.argsort(-scores, kind="stable")[:k]
        e = np.exp(scores[keep] - scores[keep].max())
        row[keep] = e / e.sum()
    return out


def as_matrix(pool: Pool, rows: Sequence[dict[str, float]]) -> np.ndarray:
    """Per-row {source → weight} (zeros left out) → (T, N) in pool order."""
    unknown = {s for row in rows for s in row} - set(pool.sources)
    assert not unknown, unknown
    return np.array([[row.get(s, 0.0) for s in pool.sources] for row in rows])


def check(
    pool: Pool,
    got: np.ndarray,
    task_query: np.ndarray | None,
    instance_queries: np.ndarray,
    lam: float,
    tau: float,
    top_k: int | None,
) -> None:
    """`got` equals the formula within TOL, while the formula is far from uniform and every
    wrong formula is far from it: a path computing any of those would fail here."""
    applied = lam if task_query is not None else 0.0  # a sentence alone: instance level only
    want = expected(pool, task_query, instance_queries, applied, tau, top_k)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    kept = want > 0
    uniform = kept / kept.sum(axis=1, keepdims=True)
    assert np.abs(want - uniform).max() > 0.1, ("too close to uniform to test with", want)
    for name, wrong in wrong_formulas(pool, task_query, instance_queries, lam, tau, top_k):
        assert np.abs(wrong - want).max() > 100 * TOL, (name, want, wrong)


def wrong_formulas(
    pool: Pool,
    task_query: np.ndarray | None,
    instance_queries: np.ndarray,
    lam: float,
    tau: float,
    top_k: int | None,
) -> list[tuple[str, np.ndarray]]:
    """Formulas a path might compute by mistake, for the same inputs."""
    q_x = np.atleast_2d(instance_queries)
    if task_query is None:
        # what instance mode did before: each sentence its own task-level query, compared
        # with cluster keys (centroids of style shifts) at the configured λ
        own = np.concatenate([expected(pool, q, q, lam, tau, top_k) for q in q_x])
        swapped = expected(pool, None, q_x, 0.0, tau, top_k, instance_side="cluster")
        out = [("sentence as style query", own), ("key spaces swapped", swapped)]
    else:
        swapped = expected(pool, task_query, q_x, lam, tau, top_k, cluster_side="input",
                           instance_side="cluster")  # fmt: skip
        out = [("λ swapped", expected(pool, task_query, q_x, 1 - lam, tau, top_k)),
               ("instance level only", expected(pool, None, q_x, 0.0, tau, top_k)),
               ("key spaces swapped", swapped)]  # fmt: skip
    if top_k is not None and top_k < len(pool.sources):
        applied = lam if task_query is not None else 0.0
        out.append(("no top-k", expected(pool, task_query, q_x, applied, tau, None)))
    return out


# ------------------------------------------------------------------ pools to test with

#: Source i's input key is ANCHORS[i]'s embedding; its style key KEY_STYLES[i]'s style shift.
ANCHORS = [
    "a dog naps by the water",
    "the bright sun shines in the sky",
    "a woman jogs beneath a bridge",
]
KEY_STYLES = ["pirate", "formal", "shakespearean"]


def keyed_entries(featurizer: Featurizer, adapters: dict[str, str]) -> list:
    """Pool entries whose keys make retrieval decisive: sentences near an anchor prefer its
    source, and a style shift prefers its own cluster (random keys give near-uniform R_s)."""
    from ray_twist.data import make_task
    from ray_twist.features import TaskKey, task_key
    from ray_twist.pool import SourceEntry

    entries = []
    for i, (name, adapter) in enumerate(adapters.items()):
        style = task_key(make_task(KEY_STYLES[i], 20, seed=i), featurizer).style_key
        key = TaskKey(style, featurizer.encode([ANCHORS[i]])[0], n_examples=20)
        entries.append(SourceEntry(name, adapter, key))
    return entries
