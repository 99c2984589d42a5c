"""The factored merge equals the dense reference and PEFT's own SVD merge; adapters round-trip."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from ray_twist.backbone import load_backbone, save_random_lora
from ray_twist.lora import AdapterFactors, read_adapter, write_adapter
from ray_twist.merge import MergeSources, dense_svd_merge, merge_lora_factors


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _random_sources(n: int, ranks: list[int], d_out: int, d_in: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks[:n]]
    b = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for r in ranks[:n]]
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("d_out", "d_in"), [(48, 40), (24, 64), (8, 8)])
def test_factored_equals_dense_reference(dtype: torch.dtype, d_out: int, d_in: int) -> None:
    a, b = _random_sources(4, [3, 5, 2, 4], d_out, d_in)
    weights = torch.rand(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rank = 6
    a_t, b_t = merge_lora_factors(a, b, weights, rank, dtype=dtype)
    a_d, b_d = dense_svd_merge(a, b, weights, rank)
    assert a_t.shape == (5, rank, d_in) and b_t.shape == (5, d_out, rank)
    assert a_t.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for t in range(5):
        assert _rel((b_t[t] @ a_t[t]).double(), b_d[t] @ a_d[t]) < tol
    # the truncation is real: rank-q error equals the tail of the singular spectrum
    full = sum(weights[0, s] * b[s] @ a[s] for s in range(4))
    s_vals = torch.linalg.svdvals(full)
    err = (full - (b_t[0] @ a_t[0]).double()).norm()
    assert err == pytest.approx(float(s_vals[rank:].norm()), rel=1e-4)


def test_linear_is_exact_and_rank_padding_is_harmless() -> None:
    a, b = _random_sources(3, [2, 2, 2], 16, 12)
    w = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    dense = sum(w[0, s] * b[s] @ a[s] for s in range(3))
    a_l, b_l = merge_lora_factors(a, b, w, rank=1, method="linear", dtype=torch.float64)
    assert a_l.shape == (1, 6, 12)
    assert _rel(b_l[0] @ a_l[0], dense) < 1e-12
    a_p, b_p = merge_lora_factors(a, b, w, rank=10, dtype=torch.float64)  # only 6 directions
    assert a_p.shape == (1, 10, 12) and torch.all(a_p[0, 6:] == 0)
    assert _rel(b_p[0] @ a_p[0], dense) < 1e-10


def test_bad_shapes_and_arguments_are_named() -> None:
    a, b = _random_sources(2, [2, 3], 8, 6)
    with pytest.raises(ValueError, match="source 1"):
        merge_lora_factors([a[0], a[1][:, :5]], b, torch.ones(1, 2), 2)
    with pytest.raises(ValueError, match="weights must be"):
        merge_lora_factors(a, b, torch.ones(1, 3), 2)
    with pytest.raises(ValueError, match="method"):
        merge_lora_factors(a, b, torch.ones(1, 2), 2, method="ties")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["t5", "gpt2", "llama", "bert2bert"])
def test_merge_matches_peft_svd_and_reloads(kind: str, tiny_backbones, tmp_path) -> None:
    base = tiny_backbones[kind]
    names = ["s0", "s1", "s2"]
    for i, name in enumerate(names):
        save_random_lora(base, tmp_path / name, seed=i, rank=4)
    weights = [0.5, 0.3, 0.2]
    rank = 3

    sources = MergeSources(names, [read_adapter(tmp_path / n) for n in names])
    [merged] = sources.merge([dict(zip(names, weights, strict=True))], rank)
    out = write_adapter(tmp_path / "merged", merged, sources.template)

    # PEFT's own dense SVD merge of the same adapters
    model = PeftModel.from_pretrained(load_backbone(base).model, str(tmp_path / names[0]), "s0")
    for name in names[1:]:
        model.load_adapter(str(tmp_path / name), adapter_name=name)
    model.add_weighted_adapter(names, weights, "peft_svd", combination_type="svd", svd_rank=rank)
    # our written adapter, reloaded through PEFT unchanged
    reloaded = PeftModel.from_pretrained(load_backbone(base).model, str(out))

    peft_layers = {n: m for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}
    ours_layers = {n: m for n, m in reloaded.named_modules() if hasattr(m, "get_delta_weight")}
    assert len(ours_layers) == len(merged) > 0
    fan = bool(sources.template.get("fan_in_fan_out"))
    for module, (a_t, b_t) in merged.items():
        ours = b_t @ a_t
        ours = ours.T if fan else ours
        peft_delta = peft_layers[module].get_delta_weight("peft_svd")
        assert _rel(ours, peft_delta) < 1e-4, module
        assert _rel(ours_layers[module].get_delta_weight("default"), ours) < 1e-6, module


def test_sources_refuse_one_module_of_two_shapes(tiny_backbones, tmp_path) -> None:
    """Sources may train different modules (see tests/test_mixed_pool.py), but a module
    whose delta has another shape in another source comes from another base model."""
    save_random_lora(tiny_backbones["t5"], tmp_path / "t5", 0, 2)
    t5 = read_adapter(tmp_path / "t5")
    module, (a, b) = next(iter(t5.modules.items()))
    other = AdapterFactors(t5.config, {module: (a[:, :-1], b)})
    with pytest.raises(ValueError, match=f"'b': module {module} has a"):
        MergeSources(["a", "b"], [t5, other])
    with pytest.raises(ValueError, match="unknown source"):
        MergeSources(["a"], [t5]).merge([{"zz": 1.0}], 2)


@pytest.mark.parametrize("decay", [0.0, 3.0])
def test_subspace_solver_matches_the_exact_merge(decay: float) -> None:
    """The GPU path's Rayleigh–Ritz solver (≤ 32-dim subspace), forced on the CPU: within 1e-4
    of the exact eigh path on 64-wide cores, for flat and fast-decaying (trained-LoRA-like,
    σ over 3 decades) source spectra, with some weights 0; "auto" on the CPU is the exact
    path itself."""
    from ray_twist.merge import FactorStack

    g = torch.Generator().manual_seed(3)
    n, r, d = 8, 8, 96
    scale = torch.logspace(0, -decay, r).unsqueeze(1)
    a = [scale * torch.randn(r, d, generator=g) / d**0.5 for _ in range(n)]
    b = [torch.randn(d, r, generator=g) / r for _ in range(n)]
    stack = FactorStack.from_factors(a, b)
    weights = torch.rand(20, n, generator=g) * (torch.rand(20, n, generator=g) > 0.3)
    exact = stack.merge_svd(weights, 8, solver="eigh")
    sub = stack.merge_svd(weights, 8, solver="subspace")
    auto = stack.merge_svd(weights, 8)
    assert all(torch.equal(x, y) for x, y in zip(exact, auto, strict=True))
    for t in range(20):
        ref = exact[1][t] @ exact[0][t]
        assert _rel(sub[1][t] @ sub[0][t], ref) < 1e-4, t
