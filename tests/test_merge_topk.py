"""Top-k merges from the selected sources' Gram blocks (`ray_twist.merge.subset`) equal the
dense merge of those k sources and today's full-stack merge; `MergeSources` picks them for
sparse batches only, and the weighted concatenations touch the selected columns only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_twist.lora import AdapterFactors
from ray_twist.merge import FactorStack, MergeSources, SubsetStack
from ray_twist.retrieval import retrieval_scores

N, D_OUT, D_IN = 16, 40, 32


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _pool(seed: int = 0) -> tuple[list[str], list[AdapterFactors], list[int]]:
    """N sources of mixed ranks on modules "m" and "n"; source 2 lacks "n" (a rank-0 block
    there), source 5 repeats source 1's directions, source 7's B is untrained (zero)."""
    g = torch.Generator().manual_seed(seed)
    ranks = [int(x) for x in torch.randint(1, 7, (N,), generator=g)]
    adapters = []
    for s, r in enumerate(ranks):
        modules = {}
        for name in ("m", "n"):
            a = torch.randn(r, D_IN, generator=g, dtype=torch.float64)
            b = torch.randn(D_OUT, r, generator=g, dtype=torch.float64) / (1 + s)
            modules[name] = (a, b)
        adapters.append(modules)
    del adapters[2]["n"]
    adapters[5] = {k: (a.clone(), 2 * b.clone()) for k, (a, b) in adapters[1].items()}
    ranks[5] = ranks[1]
    adapters[7]["m"] = (adapters[7]["m"][0], torch.zeros(D_OUT, ranks[7], dtype=torch.float64))
    names = [f"s{i}" for i in range(N)]
    return names, [AdapterFactors({}, m) for m in adapters], ranks


def _topk_weights(t: int, k: int, seed: int = 1) -> torch.Tensor:
    """Real retrieval weights: softmax over each row's top-k, exactly 0 elsewhere."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(N, 6))
    w = retrieval_scores(rng.normal(size=(t, 6)), None, keys, keys, lam=1.0, top_k=k)
    w[0] = 0.0
    w[0, [1, 5, 7]] = [0.5, 0.3, 0.2]  # the repeated and the untrained source together
    w[1] = 0.0
    w[1, [2, 9]] = [0.6, -0.4]  # fewer than k sources (padded), a negative weight
    return torch.from_numpy(w)


def _dense_topq(sources: MergeSources, module: str, w: torch.Tensor, q: int) -> torch.Tensor:
    """The reference: Σ_{s∈S} w_s B_s A_s over the selected sources only, then its top-q."""
    a_list, b_list = sources.factors(module)
    chosen = w.nonzero().squeeze(1).tolist()
    delta = sum(float(w[s]) * (b_list[s].double() @ a_list[s].double()) for s in chosen)
    u, s_vals, vh = torch.linalg.svd(torch.as_tensor(delta), full_matrices=False)
    return (u[:, :q] * s_vals[:q]) @ vh[:q]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("q", [2, 8])
def test_topk_merge_from_gram_blocks_equals_dense_merge(dtype, tol: float, q: int) -> None:
    names, adapters, _ = _pool()
    sources = MergeSources(names, adapters, dtype=dtype)
    w = _topk_weights(t=9, k=3)
    merged = sources.merge(w, q)
    for module in ("m", "n"):
        a_full, b_full = FactorStack.from_factors(*sources.factors(module), dtype=dtype).merge_svd(
            w, q
        )
        for t, out in enumerate(merged):
            a_t, b_t = out[module]
            assert a_t.shape == (q, D_IN) and b_t.shape == (D_OUT, q) and a_t.dtype == dtype
            ref = _dense_topq(sources, module, w[t], q)
            assert _rel(b_t @ a_t, ref) < tol, (module, t)
            assert _rel(b_t @ a_t, b_full[t] @ a_full[t]) < tol, (module, t)


def test_merge_sources_take_the_subset_path_for_sparse_batches_only() -> None:
    names, adapters, _ = _pool()
    sources = MergeSources(names, adapters, dtype=torch.float64)
    sparse = _topk_weights(t=4, k=4)
    [(_, a_s, b_s), _] = list(sources.merge_modules(sparse, 4))
    a_ref, b_ref = sources.subset("m").merge_svd(sparse, 4)
    assert torch.equal(a_s, a_ref) and torch.equal(b_s, b_ref)
    rows = sources.rows(sparse, "instance", 4)
    assert torch.equal(rows["m"].a, a_ref) and torch.equal(rows["m"].b, b_ref)
    # a batch with one row over N/2 sources goes through the whole stack's core
    dense = torch.cat([sparse, torch.full((1, N), 1.0 / N, dtype=torch.float64)])
    [(_, a_d, b_d), _] = list(sources.merge_modules(dense, 4))
    a_f, b_f = sources.stack("m").merge_svd(dense, 4)
    assert torch.equal(a_d, a_f) and torch.equal(b_d, b_f)
    for t in range(len(sparse)):
        assert _rel(b_d[t] @ a_d[t], b_s[t] @ a_s[t]) < 1e-10


def test_subset_stack_refuses_bad_weights() -> None:
    names, adapters, _ = _pool()
    stack = MergeSources(names, adapters).subset("m")
    assert isinstance(stack, SubsetStack) and stack.n_sources == N
    with pytest.raises(ValueError, match=f"weights must be \\(T, {N}\\)"):
        stack.merge_svd(torch.ones(2, N + 1), 4)


@pytest.mark.parametrize("mode", ["instance", "mixture"])
def test_weighted_concatenations_touch_the_selected_columns_only(mode: str) -> None:
    names, adapters, ranks = _pool()
    sources = MergeSources(names, adapters, dtype=torch.float64)
    w = _topk_weights(t=3, k=2)
    q = 3
    rows = sources.rows(w, mode, q, merge_order="truncate_then_sum")  # type: ignore[arg-type]
    used = (w != 0).any(0)
    per_source = [min(q, r) if mode == "instance" else r for r in ranks]
    assert rows["m"].a.shape[0] == sum(c for c, u in zip(per_source, used, strict=True) if u)
    full = sources.truncated("m", q) if mode == "instance" else None
    for t in range(len(w)):
        x = torch.randn(1, D_IN, dtype=torch.float64)
        got = rows["m"].select([t]).delta(x)
        if full is not None:
            ref = (x @ full.a.T * full.column_weights(w[t : t + 1])) @ full.b.T
        else:
            a_list, b_list = sources.factors("m")
            ref = sum(float(w[t, s]) * (x @ a_list[s].T @ b_list[s].T) for s in range(N))
        assert _rel(got, ref) < 1e-12
    merged = sources.merge(w, q, merge_order="truncate_then_sum")
    live = [sum(min(q, r) for r, x in zip(ranks, row, strict=True) if x != 0) for row in w]
    assert [m["m"][0].shape[0] for m in merged] == live


def test_same_shape_modules_merge_in_one_batch_as_each_alone() -> None:
    """Modules of one shape and rank run their top-k merges as one `SubsetStack` batch
    (block-diagonal cross-Grams); every module's result is its own merge's, and the dense
    reference's. Another shape, or a Gram over the size cap, merges on its own."""
    names, adapters, _ = _pool()
    g = torch.Generator().manual_seed(3)
    for i, adapter in enumerate(adapters):  # "o": another shape (rank 2 everywhere)
        a = torch.randn(2, D_IN, generator=g, dtype=torch.float64)
        adapter.modules["o"] = (a, torch.randn(D_OUT + 3, 2, generator=g, dtype=torch.float64))
        assert i == 2 or adapter.modules["n"][0].shape[1] == D_IN
    sources = MergeSources(names, adapters, dtype=torch.float64)
    assert sources.subset_groups == [("m", "n")]  # "o" merges alone
    w = _topk_weights(t=5, k=3)
    merged = {module: (a, b) for module, a, b in sources.merge_modules(w, 4)}
    for module in ("m", "n", "o"):
        a_alone, b_alone = sources.subset(module).merge_svd(w, 4)
        a_t, b_t = merged[module]
        assert a_t.shape == a_alone.shape and b_t.shape == b_alone.shape
        for t in range(len(w)):
            ref = _dense_topq(sources, module, w[t], 4)
            assert _rel(b_t[t] @ a_t[t], ref) < 1e-10, (module, t)
            assert _rel(b_t[t] @ a_t[t], b_alone[t] @ a_alone[t]) < 1e-12, (module, t)
    assert MergeSources(names, adapters, group_gram_elements=(N * 6) ** 2).subset_groups == []
