"""The frozen featurizer and task keys, with the real packaged MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

from ray_twist.data.task import Task
from ray_twist.features import (
    Featurizer,
    TaskKey,
    key_from_embeddings,
    task_key,
    task_keys,
)

TEXTS = [
    "The cat sat on the mat.",
    "A cat was sitting on the rug.",
    "Quarterly revenue rose by twelve percent.",
    "Thou art more lovely and more temperate.",
    "lol that movie was sooo good",
    "The committee shall convene at noon.",
    "Stock prices fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def featurizer() -> Featurizer:
    return Featurizer(batch_size=3)


def test_encode_is_unit_norm_float32(featurizer: Featurizer) -> None:
    emb = featurizer.encode(TEXTS)
    assert emb.shape == (len(TEXTS), featurizer.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert featurizer.encode([]).shape == (0, featurizer.dim)


def test_encode_is_batch_size_invariant(featurizer: Featurizer) -> None:
    one_batch = Featurizer(batch_size=64)
    np.testing.assert_allclose(featurizer.encode(TEXTS), one_batch.encode(TEXTS), atol=1e-5)


def test_similar_sentences_are_closer(featurizer: Featurizer) -> None:
    cat, rug, revenue = featurizer.encode(TEXTS[:3])
    assert cat @ rug > cat @ revenue + 0.2


def test_call_is_a_batch_udf(featurizer: Featurizer) -> None:
    batch = {"text": np.array(TEXTS[:2], dtype=object), "id": np.array([7, 8])}
    out = featurizer(batch)
    assert set(out) == {"text", "id", "embedding"}
    np.testing.assert_allclose(out["embedding"], featurizer.encode(TEXTS[:2]), atol=1e-6)
    with pytest.raises(KeyError, match="sentence"):
        featurizer({"sentence": np.array(["x"])})


def test_unknown_model_is_not_downloaded(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="offline"):
        Featurizer(str(tmp_path / "no-such-model"))


def test_key_from_embeddings_weighs_rows_equally() -> None:
    emb = np.array([[10.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(key_from_embeddings(emb), [2**-0.5, 2**-0.5], atol=1e-6)
    with pytest.raises(ValueError, match="emb"):
        key_from_embeddings(np.zeros((0, 3)))


def _tasks() -> list[Task]:
    return [
        Task("formal", sources=TEXTS[4:5] * 2, targets=TEXTS[5:7]),
        Task("poetic", sources=TEXTS[:2], targets=TEXTS[3:4] * 2),
    ]


def test_task_key_style_is_the_shift_from_sources_to_targets(featurizer: Featurizer) -> None:
    task = _tasks()[0]
    key = task_key(task, featurizer)
    assert isinstance(key, TaskKey) and key.n_examples == 2
    shift = featurizer.encode(task.targets).mean(0) - featurizer.encode(task.sources).mean(0)
    np.testing.assert_allclose(key.style_key, shift / np.linalg.norm(shift), atol=1e-5)
    assert np.linalg.norm(key.style_key) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(key.input_key, featurizer.encode(task.sources[:1])[0], atol=1e-5)


def test_large_task_is_keyed_on_a_seeded_sample(featurizer: Featurizer) -> None:
    """`max_examples` keys a larger task on `Task.sample(n=max_examples, seed=0)`; the key
    still counts every example, and a task within the cap is keyed on all of it."""
    from ray_twist.retrieval import RetrievalSettings

    task = Task("mixed", sources=TEXTS[:6], targets=TEXTS[1:7])
    sampled = task_key(task, featurizer, max_examples=3)
    reference = task_key(task.sample(n=3, seed=0), featurizer)
    np.testing.assert_allclose(sampled.style_key, reference.style_key, atol=1e-6)
    np.testing.assert_allclose(sampled.input_key, reference.input_key, atol=1e-6)
    assert sampled.n_examples == 6
    assert np.abs(sampled.style_key - task_key(task, featurizer).style_key).max() > 1e-3
    whole = task_key(task, featurizer, max_examples=6)
    np.testing.assert_allclose(whole.style_key, task_key(task, featurizer).style_key, atol=1e-6)
    # the setting reaches retrieval; its default stays out of dumps (run names unchanged)
    assert "key_examples" not in RetrievalSettings().model_dump()
    assert RetrievalSettings(key_examples=None).model_dump()["key_examples"] is None


def test_ray_data_actor_pool_matches_encode(featurizer: Featurizer, ray_session) -> None:
    ds = ray_session.data.from_items([{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    rows = ds.map_batches(
        Featurizer, fn_constructor_kwargs={"batch_size": 2}, concurrency=1, batch_size=3
    ).take_all()
    got = np.stack([r["embedding"] for r in sorted(rows, key=lambda r: r["id"])])
    np.testing.assert_allclose(got, featurizer.encode(TEXTS), atol=1e-5)

    keys = task_keys(_tasks(), batch_size=4)
    for task in _tasks():
        local = task_key(task, featurizer)
        np.testing.assert_allclose(keys[task.name].style_key, local.style_key, atol=1e-5)
        np.testing.assert_allclose(keys[task.name].input_key, local.input_key, atol=1e-5)
        assert keys[task.name].n_examples == len(task)
