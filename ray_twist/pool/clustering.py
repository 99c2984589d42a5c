"""Spectral clustering of style keys into cluster keys (the pool's first retrieval level)."""

from __future__ import annotations

import warnings

import numpy as np

from ray_twist.vectors import unit_rows


def _eigengap_k(affinity: np.ndarray) -> int:
    """Clusters = largest gap in the normalised Laplacian's spectrum (≥ connected parts)."""
    inv = 1.0 / np.sqrt(affinity.sum(axis=1))
    lap = np.eye(len(affinity)) - inv[:, None] * affinity * inv[None, :]
    eig = np.clip(np.linalg.eigvalsh(lap), 0.0, None)
    components = int((eig < 1e-8).sum())
    return max(int(np.argmax(np.diff(eig))) + 1, components, 1)


def cluster_keys(
    keys: np.ndarray, n_clusters: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral clustering of style keys → (labels (N,), unit centroids (C, d)).

    Affinity is cosine similarity clipped at 0, squared. Without `n_clusters` the eigengap decides
    (N=1: one cluster; N=2: one if cosine ≥ 0.9). Labels are numbered by first appearance,
    so the result is deterministic for a given input order and seed.
    """
    keys = unit_rows(keys).astype(np.float64)
    n = len(keys)
    if keys.ndim != 2 or n == 0:
        raise ValueError(f"keys must be a non-empty (N, d) array, got shape {keys.shape}")
    if n_clusters is not None and n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    # squared clipped cosine: weak, content-level similarity fades, sibling styles stand out
    affinity = np.clip(keys @ keys.T, 0.0, 1.0) ** 2
    if n_clusters is not None:
        k = min(n_clusters, n)
    elif n <= 2:
        k = 1 if n == 1 or affinity[0, 1] >= 0.81 else 2
    else:
        k = min(_eigengap_k(affinity), n)
    if k == 1:
        raw = np.zeros(n, dtype=np.int64)
    elif k == n:
        raw = np.arange(n)
    else:
        from sklearn.cluster import SpectralClustering

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected"
            raw = SpectralClustering(
                n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=seed
            ).fit_predict(affinity)
    order = {c: i for i, c in enumerate(dict.fromkeys(raw.tolist()))}
    labels = np.array([order[c] for c in raw.tolist()], dtype=np.int64)
    centroids = np.stack([keys[labels == c].mean(axis=0) for c in range(len(order))])
    return labels, unit_rows(centroids)
