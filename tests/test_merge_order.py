"""`merge_order`: sum_then_truncate (top-q SVD of Σ R_s ΔW_s, unchanged) vs truncate_then_sum
(Σ R_s trunc_q(ΔW_s), kept exactly at rank Σ min(q, r_s)), against dense references, through
PEFT, `twist adapt`'s init, `twist init`, `twist merge`, the merge_targets job, serving (server
default and per request: here, the engine, and over HTTP in test_serve), bulk restyle (here,
and a real `twist restyle --merge-order` run in test_restyle) and the study's plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from retrieval_reference import as_matrix, check, mean_key, shift_key

from ray_twist.adapt import AdaptConfig
from ray_twist.backbone import Backbone, load_backbone, save_random_lora
from ray_twist.initialise import MergeTargetsConfig
from ray_twist.lora import read_adapter, write_adapter
from ray_twist.merge import (
    MERGE_ORDERS,
    MergeOrder,
    MergeSources,
    TruncatedStack,
    dense_svd_merge,
    merge_lora_factors,
)
from ray_twist.recipes.study.config import AblationSettings, StudyConfig
from ray_twist.restyle.config import RestyleCorpusConfig
from ray_twist.retrieval import InstanceRetrievalSettings, RetrievalSettings

TTS: MergeOrder = "truncate_then_sum"


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _random_sources(ranks: list[int], d_out: int, d_in: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks]
    b = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for r in ranks]
    return a, b


def _trunc(delta: torch.Tensor, q: int) -> torch.Tensor:
    """The dense reference: top-q SVD of one matrix."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :q] * s[:q]) @ vh[:q]


def _tts_reference(a: list, b: list, weights, q: int) -> torch.Tensor:
    """Σ_s w_s trunc_q(B_s A_s), every trunc_q a dense torch.linalg.svd."""
    return sum(float(w) * _trunc(bs.double() @ as_.double(), q) for w, as_, bs in zip(weights, a, b, strict=True))  # type: ignore[return-value]  # fmt: skip


def _stt_reference(a: list, b: list, weights, q: int) -> torch.Tensor:
    return _trunc(sum(float(w) * (bs.double() @ as_.double()) for w, as_, bs in zip(weights, a, b, strict=True)), q)  # type: ignore[arg-type]  # fmt: skip


# ------------------------------------------------------------------ the maths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("d_out", "d_in"), [(48, 40), (24, 64), (8, 8)])
def test_truncate_then_sum_equals_dense_reference(dtype, d_out: int, d_in: int) -> None:
    ranks, q = [3, 5, 2, 4], 3
    a, b = _random_sources(ranks, d_out, d_in)
    weights = torch.rand(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights[1, 2] = 0.0
    weights[2, 0] = -0.7  # signs survive the symmetric √|w| split
    a_t, b_t = merge_lora_factors(a, b, weights, q, dtype=dtype, merge_order=TTS)
    k = sum(min(q, r) for r in ranks)
    assert a_t.shape == (5, k, d_in) and b_t.shape == (5, d_out, k) and a_t.dtype == dtype
    a_d, b_d = dense_svd_merge(a, b, weights, q, merge_order=TTS)
    assert a_d.shape == (5, k, d_in)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for t in range(5):
        ref = _tts_reference(a, b, weights[t], q)
        assert _rel(b_t[t] @ a_t[t], ref) < tol
        assert _rel(b_d[t] @ a_d[t], ref) < 1e-10
        # balanced factors: B_t and A_t carry the same norm per column
        col_b, row_a = b_t[t].double().norm(dim=0), a_t[t].double().norm(dim=1)
        assert torch.allclose(col_b, row_a, rtol=1e-4, atol=1e-6)


def test_sum_then_truncate_is_unchanged() -> None:
    a, b = _random_sources([3, 5, 2, 4], 32, 24)
    w = torch.rand(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    default = merge_lora_factors(a, b, w, 3)
    explicit = merge_lora_factors(a, b, w, 3, merge_order="sum_then_truncate")
    assert all(torch.equal(x, y) for x, y in zip(default, explicit, strict=True))
    assert default[0].shape == (3, 3, 24)
    for t in range(3):
        assert _rel(default[1][t] @ default[0][t], _stt_reference(a, b, w[t], 3)) < 1e-5
    sources = MergeSources(list("abcd"), _adapters(a, b))
    [m_default] = sources.merge(w[:1], 3)
    [m_explicit] = sources.merge(w[:1], 3, merge_order="sum_then_truncate")
    assert torch.equal(m_default["m"][0], m_explicit["m"][0])


def test_the_orders_differ_where_they_should() -> None:
    """q < r_s: the truncations differ in delta and rank. q ≥ every r_s: truncate_then_sum
    is the exact sum (the "linear" merge), sum_then_truncate still truncates."""
    a, b = _random_sources([4, 4, 4], 20, 18)
    w = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    q = 2
    a_s, b_s = merge_lora_factors(a, b, w, q, dtype=torch.float64)
    a_t, b_t = merge_lora_factors(a, b, w, q, dtype=torch.float64, merge_order=TTS)
    stt, tts = b_s[0] @ a_s[0], b_t[0] @ a_t[0]
    assert a_s.shape[1] == 2 and a_t.shape[1] == 6
    assert torch.linalg.matrix_rank(tts) == 6 and torch.linalg.matrix_rank(stt) == 2
    assert _rel(stt, tts) > 0.1
    assert _rel(tts, _tts_reference(a, b, w[0], q)) < 1e-10
    assert _rel(stt, _tts_reference(a, b, w[0], q)) > 0.1  # the references differ too

    exact = sum(w[0, s] * b[s] @ a[s] for s in range(3))
    a_l, b_l = merge_lora_factors(a, b, w, 4, dtype=torch.float64, merge_order=TTS)
    assert _rel(b_l[0] @ a_l[0], exact) < 1e-10  # type: ignore[arg-type]
    a_4, b_4 = merge_lora_factors(a, b, w, 4, dtype=torch.float64)
    assert _rel(b_4[0] @ a_4[0], exact) > 0.1  # type: ignore[arg-type]


def test_bad_orders_are_refused() -> None:
    a, b = _random_sources([2, 3], 8, 6)
    with pytest.raises(ValueError, match="merge_order must be one of"):
        merge_lora_factors(a, b, torch.ones(1, 2), 2, merge_order="ties")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="untruncated"):
        merge_lora_factors(a, b, torch.ones(1, 2), 2, method="linear", merge_order=TTS)
    stack = TruncatedStack.from_factors(a, b, 2)
    with pytest.raises(ValueError, match="rank 2, not 3"):
        merge_lora_factors([], [], torch.ones(1, 2), 3, merge_order=TTS, truncated=stack)
    with pytest.raises(ValueError, match="merge_order"):
        RetrievalSettings.model_validate({"merge_order": "ties"})
    with pytest.raises(ValueError, match="method linear never truncates"):
        MergeTargetsConfig(pool="p", targets="t", out="o", method="linear",
                           retrieval=RetrievalSettings(merge_order=TTS))  # fmt: skip


def _adapters(a: list, b: list):
    from ray_twist.lora import AdapterFactors

    return [AdapterFactors({}, {"m": (x, y)}) for x, y in zip(a, b, strict=True)]


def test_sources_cache_the_truncations_and_drop_zero_weight_sources() -> None:
    a, b = _random_sources([4, 3, 5], 16, 12)
    sources = MergeSources(["x", "y", "z"], _adapters(a, b), dtype=torch.float64)
    rows = [{"x": 0.6, "z": 0.4}, {"x": 0.2, "y": 0.3, "z": 0.5}]
    for method in ("svd", "dense-svd"):
        merged = sources.merge(rows, 2, method, TTS)  # type: ignore[arg-type]
        assert [m["m"][0].shape[0] for m in merged] == [4, 6]  # Σ min(q, r_s) over R_s ≠ 0
        for row, m in zip(rows, merged, strict=True):
            w = [row.get(n, 0.0) for n in sources.names]
            # dict weights become a float32 tensor (`weights_tensor`): 1e-7, not 1e-15
            assert _rel(m["m"][1] @ m["m"][0], _tts_reference(a, b, w, 2)) < 1e-6
    stack = sources.truncated("m", 2)
    assert sources.truncated("m", 2) is stack and stack.ranks == (2, 2, 2)
    assert sources.truncated("m", 4).ranks == (4, 3, 4)


# ------------------------------------------------------------------ PEFT adapters


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_truncate_then_sum_adapters_load_in_peft(kind: str, tiny_backbones, tmp_path) -> None:
    """Written at rank Σ min(q, r_s) over the live sources, reloaded by PEFT unchanged, its
    delta equals the dense Σ R_s trunc_q(ΔW_s) (GPT-2: fan_in_fan_out Conv1D layers)."""
    base = tiny_backbones[kind]
    names = ["s0", "s1", "s2"]
    for i, name in enumerate(names):
        save_random_lora(base, tmp_path / name, seed=i, rank=4)
    adapters = [read_adapter(tmp_path / n) for n in names]
    weights = {"s0": 0.5, "s1": 0.0, "s2": -0.3}
    q = 2
    sources = MergeSources(names, adapters)
    [merged] = sources.merge([weights], q, merge_order=TTS)
    out = write_adapter(tmp_path / "merged", merged, sources.template)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2 * q
    reloaded = PeftModel.from_pretrained(load_backbone(base).model, str(out))
    layers = {n: m for n, m in reloaded.named_modules() if hasattr(m, "get_delta_weight")}
    assert len(layers) == len(merged) > 0
    fan = bool(sources.template.get("fan_in_fan_out"))
    w = [weights[n] for n in names]
    for module in merged:
        a_list = [ad.modules[module][0] for ad in adapters]
        b_list = [ad.modules[module][1] for ad in adapters]
        ref = _tts_reference(a_list, b_list, w, q)
        delta = layers[module].get_delta_weight("default")
        assert _rel(delta.T if fan else delta, ref) < 1e-5, module
        # and it is not the sum_then_truncate merge
        assert _rel(ref, _stt_reference(a_list, b_list, w, q)) > 1e-3, module


# ------------------------------------------------------------------ adapt / init / merge


def _pool_reference(pool, weights: dict[str, float], q: int) -> dict[str, torch.Tensor]:
    factors = {name: pool.load_factors(name) for name in pool.sources}
    w = [weights.get(n, 0.0) for n in pool.sources]
    modules = factors[pool.sources[0]]
    return {
        m: _tts_reference([factors[n][m][0] for n in pool.sources],
                          [factors[n][m][1] for n in pool.sources], w, q)
        for m in modules
    }  # fmt: skip


def _peft_deltas(base: str, adapter_dir: str) -> tuple[dict[str, torch.Tensor], int]:
    model = PeftModel.from_pretrained(load_backbone(base).model, adapter_dir)
    config = cast(LoraConfig, model.peft_config["default"])
    fan = bool(config.fan_in_fan_out)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight"):
            delta = module.get_delta_weight("default")
            out[name] = delta.T if fan else delta  # PEFT module paths, as in the pool
    return out, int(config.r)


@pytest.mark.parametrize("top_k", [None, 2])
def test_adapt_init_with_truncate_then_sum(t5_pool, tmp_path: Path, top_k: int | None) -> None:
    """`twist adapt`'s TWIST init: PEFT loads it; its delta is Σ R_s trunc_q(ΔW_s) of the
    weights it reports; rank q per source kept (top-k: only the k retrieved sources)."""
    from ray_twist.adapt import init_adapter, run_name
    from ray_twist.data import make_task
    from ray_twist.features import Featurizer
    from ray_twist.initialise import RETRIEVAL_FILE
    from ray_twist.pool import Pool

    pool_uri, base = t5_pool
    pool = Pool.open(pool_uri)
    q = 2
    retrieval = RetrievalSettings(top_k=top_k, merge_order=TTS)
    config = AdaptConfig(init="twist", rank=q, retrieval=retrieval)
    task = make_task("sailor", 8)
    weights = init_adapter(pool, task, str(tmp_path), config, Featurizer())
    live = [n for n in pool.sources if weights[n] != 0]
    assert len(live) == (top_k or len(pool.sources))
    deltas, rank = _peft_deltas(base, str(tmp_path))
    assert rank == q * len(live)  # every source's LoRA is rank 4 > q
    reference = _pool_reference(pool, weights, q)
    assert set(deltas) == set(reference)
    for module, ref in reference.items():
        assert _rel(deltas[module], ref) < 1e-5, module
    record = json.loads((tmp_path / RETRIEVAL_FILE).read_text())
    assert record["merge_order"] == TTS and record["rank"] == q
    # the setting names the run; the default leaves existing run names as they were
    default = AdaptConfig(init="twist", rank=q)
    assert run_name(task, config, pool, base) != run_name(task, default, pool, base)
    assert "merge_order" not in json.dumps(default.model_dump(mode="json"))


def test_uniform_init_and_cli_merge_follow_the_order(t5_pool, tmp_path: Path, capsys) -> None:
    from ray_twist.adapt import init_adapter
    from ray_twist.cli import main
    from ray_twist.data import make_task
    from ray_twist.pool import Pool

    pool_uri, base = t5_pool
    pool = Pool.open(pool_uri)
    config = AdaptConfig(init="uniform", rank=3, retrieval=RetrievalSettings(merge_order=TTS))
    weights = init_adapter(pool, make_task("sailor", 4), str(tmp_path / "u"), config)
    deltas, rank = _peft_deltas(base, str(tmp_path / "u"))
    assert rank == 3 * len(pool.sources)
    for module, ref in _pool_reference(pool, weights, 3).items():
        assert _rel(deltas[module], ref) < 1e-5, module

    given = {pool.sources[0]: 0.7, pool.sources[1]: 0.3}
    out = tmp_path / "cli"
    assert main(["merge", "--pool", pool_uri, "--weights", json.dumps(given), "--rank", "1",
                 "--out", str(out), "--merge-order", TTS]) == 0  # fmt: skip
    deltas, rank = _peft_deltas(base, str(out))
    assert rank == 2
    for module, ref in _pool_reference(pool, given, 1).items():
        assert _rel(deltas[module], ref) < 1e-5, module


@pytest.fixture(scope="module")
def polite(tmp_path_factory) -> tuple:
    """A target task (register family: a sibling of the pool's "formal") and its data file."""
    from ray_twist.data import make_task, write_task_jsonl

    task = make_task("polite", 8, seed=3)
    return task, write_task_jsonl(task, tmp_path_factory.mktemp("polite") / "polite.jsonl")


def _check_target_weights(pool, featurizer, task, weights: dict, lam: float) -> None:
    """A target task's R_s against the formula: its style shift at the task level, its mean
    input at the instance level (`retrieval_reference`, not `ray_twist.retrieval`)."""
    q_t = shift_key(featurizer, task.sources, task.targets)
    q_x = mean_key(featurizer, task.sources)
    check(pool, as_matrix(pool, [weights]), q_t, q_x, lam, 0.1, None)


def test_cli_init_retrieves_by_the_formula_and_merges_in_order(
    keyed_pool, featurizer, polite, tmp_path: Path
) -> None:
    """`twist init --merge-order truncate_then_sum`: the recorded R_s is the formula's, and the
    adapter PEFT loads is Σ R_s trunc_q(ΔW_s) at rank q × the sources it weights."""
    from ray_twist.cli import main
    from ray_twist.initialise import RETRIEVAL_FILE
    from ray_twist.pool import Pool

    pool_uri, base = keyed_pool
    task, data = polite
    out = tmp_path / "init"
    assert main(["init", "--pool", pool_uri, "--target", data, "--out", str(out), "--rank", "2",
                 "--lambda", "0.8", "--merge-order", TTS]) == 0  # fmt: skip
    record = json.loads((out / RETRIEVAL_FILE).read_text())
    pool = Pool.open(pool_uri)
    _check_target_weights(pool, featurizer, task, record["weights"], 0.8)
    assert record["merge_order"] == TTS and record["lambda"] == 0.8
    deltas, rank = _peft_deltas(base, str(out))
    assert rank == 2 * len(pool.sources)  # every source weighted, each kept at q = 2 < r_s
    for module, ref in _pool_reference(pool, record["weights"], 2).items():
        assert _rel(deltas[module], ref) < 1e-5, module


def test_merge_targets_job_retrieves_by_the_formula_and_merges_in_order(
    keyed_pool, featurizer, polite, tmp_path: Path
) -> None:
    """`jobs/merge_targets.py` (`run_merge_targets`): `retrieval.merge_order` reaches a target
    with given weights and one retrieved from its data; R_s of the latter is the formula's."""
    from ray_twist.initialise import RETRIEVAL_FILE, run_merge_targets
    from ray_twist.pool import Pool

    pool_uri, base = keyed_pool
    pool = Pool.open(pool_uri)
    task, data = polite
    given = {pool.sources[0]: 0.7, pool.sources[2]: 0.3}
    table = tmp_path / "targets.jsonl"
    table.write_text(json.dumps({"name": "given", "weights": given}) + "\n"
                     + json.dumps({"name": "polite", "data": data}) + "\n")  # fmt: skip
    retrieval = RetrievalSettings.model_validate({"lambda": 0.8, "merge_order": TTS})
    config = MergeTargetsConfig(pool=pool_uri, targets=str(table), out=str(tmp_path / "out"),
                                rank=2, retrieval=retrieval)  # fmt: skip
    run_merge_targets(config)
    for name in ("given", "polite"):
        record = json.loads((tmp_path / "out" / name / RETRIEVAL_FILE).read_text())
        assert record["merge_order"] == TTS
        weights = record["weights"]
        deltas, rank = _peft_deltas(base, str(tmp_path / "out" / name))
        assert rank == 2 * sum(w != 0 for w in weights.values())
        for module, ref in _pool_reference(pool, weights, 2).items():
            assert _rel(deltas[module], ref) < 1e-5, (name, module)
    assert record["weights"] != given
    _check_target_weights(pool, featurizer, task, record["weights"], 0.8)


def test_serving_orders_are_limited_by_the_server() -> None:
    """A request may ask only for an order in the server's `limits.merge_orders` (422 naming
    `merge_order`), and the server's default must be one of them."""
    from ray_twist.serve.api import ApiError, parse_restyle
    from ray_twist.serve.config import LimitSettings, ServeConfig

    body = json.dumps({"texts": ["hi"], "mode": "instance", "merge_order": TTS}).encode()
    assert parse_restyle(body, LimitSettings()).merge_order == TTS
    with pytest.raises(ApiError) as exc:
        parse_restyle(body, LimitSettings(merge_orders=["sum_then_truncate"]))
    assert (exc.value.status, exc.value.field) == (422, "merge_order")
    assert "not enabled on this server" in exc.value.message
    with pytest.raises(ValueError, match="not in limits.merge_orders"):
        ServeConfig.model_validate({"pool": "p", "retrieval": {"merge_order": TTS},
                                    "limits": {"merge_orders": ["sum_then_truncate"]}})  # fmt: skip


# ------------------------------------------------------------------ serving and bulk restyle


def test_styler_rows_follow_the_order(t5_pool) -> None:
    """The per-row code serving and bulk restyle share: `row_factors` (the shared truncated
    stack with per-row column weights) and `MergeSources.merge` (the adapters init writes)
    both give each row Σ_s R_s trunc_q(ΔW_s) of its own weights."""
    from ray_twist.pool import Pool
    from ray_twist.styler import Styler

    pool = Pool.open(t5_pool[0])
    backbone = load_backbone(t5_pool[1])
    settings = InstanceRetrievalSettings(rank=2, top_k=2, merge_order=TTS)
    styler = Styler(backbone, pool, settings, "cpu", modes=("instance",))
    texts = ["the old dog sleeps", "a green river runs near the sun"]
    weights = styler.weights(texts)
    assert ((weights > 0).sum(axis=1) == 2).all()
    # rows with and without a style in one call: each as if retrieved on its own
    mixed = styler.weights(texts, [None, "pirate"])
    np.testing.assert_allclose(mixed[0], weights[0], atol=1e-6)  # padding differs by batch
    np.testing.assert_allclose(mixed[1], styler.weights(texts[1:], ["pirate"])[0], atol=1e-6)
    rows = styler.row_factors(weights, "instance")
    merged = styler.sources.merge(torch.from_numpy(weights).float(), 2, merge_order=TTS)
    for r, row in enumerate(weights):
        reference = _pool_reference(pool, dict(zip(pool.sources, row.tolist(), strict=True)), 2)
        for module, ref in reference.items():
            a, b = merged[r][module]
            assert a.shape[0] == 4 and _rel(b @ a, ref) < 1e-5, module
            f = rows[module]
            # the columns of the sources some row retrieved, not the whole pool's
            assert f.scale is not None and f.a.shape[0] == 2 * int((weights != 0).any(0).sum())
            x = torch.randn(1, 3, f.a.shape[1], dtype=f.a.dtype)  # one row, 3 tokens
            assert _rel(f.select([r]).delta(x), x @ ref.T.to(f.a.dtype)) < 1e-5, module
    # sum_then_truncate: unchanged per-row rank-q factors
    plain = Styler(backbone, pool, InstanceRetrievalSettings(rank=2, top_k=2), "cpu")
    assert plain.row_factors(weights)[module].a.shape == (2, 2, f.a.shape[1])


def test_serving_engine_instance_mode_uses_the_order(t5_pool, tmp_path: Path) -> None:
    """A real serving engine (no HTTP): instance-mode outputs equal PEFT with an adapter
    merged, truncate_then_sum, from each row's reported weights."""
    from ray_twist.generation import generate
    from ray_twist.initialise import merge_weighted
    from ray_twist.pool import Pool, pool_merge_sources
    from ray_twist.serve.api import RestyleRequest
    from ray_twist.serve.config import ServeConfig
    from ray_twist.serve.engine import Engine

    pool_uri, base = t5_pool
    retrieval = {"rank": 2, "top_k": 2, "merge_order": TTS}
    config = ServeConfig.model_validate({"pool": pool_uri, "retrieval": retrieval})
    engine = Engine(config, device="cpu")
    texts = ["the old dog sleeps", "a green river runs near the sun"]
    request = RestyleRequest(texts=texts, mode="instance", max_new_tokens=6)
    [response] = engine.run([engine.prepare(request)])
    [two] = engine.styler.sources.merge(torch.tensor([[0.5, 0.5, 0.0]]), 2, merge_order=TTS)
    assert {a.shape[0] for a, _ in two.values()} == {4}  # 2 live sources × q = 2: not q
    merge = pool_merge_sources(Pool.open(pool_uri))
    for k, (text, row, got) in enumerate(zip(texts, response.retrieval, response.outputs, strict=True)):  # fmt: skip
        ref = str(tmp_path / f"ref{k}")
        merge_weighted(merge, [ref], [row], 2, progress=False, merge_order=TTS)
        assert generate(_adapted(base, ref), [text], max_new_tokens=6) == [got], text


def _adapted(base: str, adapter: str) -> Backbone:
    backbone = load_backbone(base)
    backbone.model = PeftModel.from_pretrained(backbone.model, adapter).merge_and_unload().eval()
    return backbone


def test_restyle_takes_the_order(tmp_path: Path, monkeypatch) -> None:
    """Bulk restyle: the config and `restyle_corpus` carry it into the job's retrieval
    settings (what each actor's Styler runs with); the default keeps job identities
    (resume records) as they were."""
    from ray_twist.restyle import driver
    from ray_twist.restyle.actor import RestyleJob

    cfg = RestyleCorpusConfig(input="in", output="out", pool="p",
                              retrieval=InstanceRetrievalSettings(merge_order=TTS))  # fmt: skip
    assert cfg.retrieval is not None and cfg.retrieval.merge_order == TTS
    seen: dict = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(driver, "restyle_corpus", fake)
    driver.run_restyle_corpus(cfg)
    assert seen["merge_order"] == TTS
    with pytest.raises(ValueError, match=r"retrieval settings \(merge_order\) apply only"):
        driver._style_source(None, "a", None, None, {"merge_order": TTS})
    from ray_twist.generation import GenerationSettings

    def identity(retrieval: InstanceRetrievalSettings) -> dict:
        job = RestyleJob("in", "out", "base", None, "instance", None, GenerationSettings(), 32,
                         "text", "id", pool="p", pool_generation=1, retrieval=retrieval)  # fmt: skip
        return job.identity()["retrieval"]

    # the λ applied: 0 for this style-less job (the instance level alone)
    assert identity(InstanceRetrievalSettings()) == {"lam": 0.0, "tau": 0.1, "top_k": None,
                                                     "rank": 8}  # fmt: skip
    assert identity(InstanceRetrievalSettings(merge_order=TTS))["merge_order"] == TTS


# ------------------------------------------------------------------ the study


def test_study_sweeps_the_merge_order() -> None:
    from ray_twist.recipes.study import plan_runs

    config = StudyConfig(out="x")
    assert config.ablations == AblationSettings()
    assert config.ablations.merge_orders == list(MERGE_ORDERS)
    specs = plan_runs(config)
    sweep = [s for s in specs if s.sweep == "merge_order"]
    fraction = config.ablations.fraction
    assert {(s.merge_order, s.init, s.fraction) for s in sweep} == {
        (order, "twist", fraction) for order in MERGE_ORDERS
    }
    # the default order's run is the λ sweep's (same key, same name as before the setting)
    default = next(s for s in sweep if s.merge_order == "sum_then_truncate")
    assert default.name == "twist-f0p01-s0-q8-l0p5-t0p1-kall"
    other = next(s for s in sweep if s.merge_order == TTS)
    assert other.name == default.name + "-" + TTS and other.key != default.key
    assert all(not s.name.endswith(TTS) for s in specs if s.merge_order != TTS)
    assert np.unique([s.name for s in specs]).size == len({s.key for s in specs})
