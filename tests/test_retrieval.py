"""Retrieval scores R_s: normalisation, top-k, λ and τ behaviour, pool conveniences."""

from __future__ import annotations

import numpy as np
import pytest

from ray_twist.features import TaskKey
from ray_twist.retrieval import (
    RetrievalSettings,
    applied_lambda,
    applied_retrieval,
    instance_retrieval,
    levels,
    retrieval_scores,
    task_retrieval,
)

T, N, D = 5, 6, 8


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def keys(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return data["cluster_keys_per_source"], data["weight_keys"]


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "task_queries": unit(rng.normal(size=(T, D))),
        "instance_queries": unit(rng.normal(size=(T, D))),
        "cluster_keys_per_source": unit(rng.normal(size=(N, D))),
        "weight_keys": unit(rng.normal(size=(N, D))),
    }


def test_rows_sum_to_one_with_zeros_outside_top_k(data) -> None:
    scores = retrieval_scores(**data, top_k=3)
    assert scores.shape == (T, N)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    assert ((scores > 0).sum(axis=1) == 3).all()
    full = retrieval_scores(**data)
    kept = np.argsort(-full, axis=1)[:, :3]
    assert (np.sort(np.argsort(-scores, axis=1)[:, :3]) == np.sort(kept)).all()
    assert (retrieval_scores(**data, top_k=100) > 0).all()  # capped at N


def test_matches_the_formula(data) -> None:
    lam, tau = 0.3, 0.2
    logits = (
        lam * data["task_queries"] @ data["cluster_keys_per_source"].T
        + (1 - lam) * data["instance_queries"] @ data["weight_keys"].T
    ) / tau
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(retrieval_scores(**data, lam=lam, tau=tau), expected, rtol=1e-6)


def test_lambda_selects_the_level(data) -> None:
    only_task = retrieval_scores(data["task_queries"], None, *keys(data), lam=1.0)
    shuffled = {**data, "instance_queries": data["instance_queries"][::-1]}
    np.testing.assert_allclose(retrieval_scores(**shuffled, lam=1.0), only_task)
    np.testing.assert_allclose(retrieval_scores(**data, lam=1.0), only_task)

    only_inst = retrieval_scores(None, data["instance_queries"], *keys(data), lam=0.0)
    shuffled = {**data, "task_queries": data["task_queries"][::-1]}
    np.testing.assert_allclose(retrieval_scores(**shuffled, lam=0.0), only_inst)
    assert not np.allclose(retrieval_scores(**data, lam=0.5), only_inst)


def test_lower_tau_sharpens(data) -> None:
    sharp, soft = (retrieval_scores(**data, tau=t) for t in (0.01, 1.0))
    assert (sharp.max(axis=1) > soft.max(axis=1)).all()
    assert (sharp.argmax(axis=1) == soft.argmax(axis=1)).all()


def test_ties_are_broken_by_source_order() -> None:
    keys = np.tile(np.eye(D)[:1], (N, 1))
    scores = retrieval_scores(np.eye(D)[:1], np.eye(D)[:1], keys, keys, top_k=2)
    np.testing.assert_allclose(scores, [[0.5, 0.5, 0, 0, 0, 0]])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lam": 1.5}, "lam"),
        ({"tau": 0.0}, "tau"),
        ({"top_k": 0}, "top_k"),
        ({"task_queries": np.ones((T, D + 1))}, "task_queries"),
        ({"instance_queries": np.ones((T + 1, D))}, "instance_queries"),
        ({"weight_keys": np.ones((N - 1, D))}, "weight_keys"),
        ({"task_queries": None}, "task_queries"),
    ],
)
def test_bad_arguments_are_named(data, kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        retrieval_scores(**{**data, **kwargs})


class FakePool:
    """The read-side surface retrieval uses, without adapters."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.sources = [f"s{i}" for i in range(N)]
        self.input_keys = data["weight_keys"]
        self._cluster = data["cluster_keys_per_source"]

    def source_cluster_keys(self) -> np.ndarray:
        return self._cluster


def test_pool_conveniences(data) -> None:
    pool = FakePool(data)
    key = TaskKey(data["task_queries"][0], data["instance_queries"][0], 10)
    weights = task_retrieval(pool, key, top_k=2)  # type: ignore[arg-type]
    assert list(weights) == pool.sources and sum(weights.values()) == pytest.approx(1.0)
    expected = retrieval_scores(
        **{k: v[:1] if "queries" in k else v for k, v in data.items()}, top_k=2
    )
    np.testing.assert_allclose(list(weights.values()), expected[0])

    style = data["task_queries"][0]
    per_row = instance_retrieval(pool, data["instance_queries"], style_query=style, lam=1.0)  # type: ignore[arg-type]
    assert per_row.shape == (T, N) and np.allclose(per_row, per_row[0])
    # without a style query: the instance level alone, whatever λ (a sentence is no shift)
    for lam in (0.0, 0.5, 1.0):
        own = instance_retrieval(pool, data["instance_queries"], lam=lam)  # type: ignore[arg-type]
        alone = retrieval_scores(None, data["instance_queries"], *keys(data), lam=0.0)
        np.testing.assert_allclose(own, alone)
    mixed = retrieval_scores(data["instance_queries"], data["instance_queries"], *keys(data))
    assert not np.allclose(own, mixed)


def test_applied_lambda_and_levels() -> None:
    settings = RetrievalSettings.model_validate({"lambda": 0.7, "top_k": 2})
    assert applied_retrieval(settings, True) == {
        "lambda": 0.7, "levels": ["task", "instance"], "tau": 0.1, "top_k": 2
    }  # fmt: skip
    assert applied_retrieval(settings, False)["lambda"] == applied_lambda(0.7, False) == 0.0
    assert levels(0.0) == ["instance"] and levels(1.0) == ["task"]
