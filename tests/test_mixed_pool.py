"""Heterogeneous pools: adapters of any r, α, rsLoRA, rank/alpha patterns and target modules
share a pool, and every merge of them equals the dense reference built from PEFT's own deltas
(and PEFT's `add_weighted_adapter(combination_type="svd")` where PEFT can merge them);
what cannot be merged, and bad input, is refused with the pool left as it was."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from ray_twist.backbone import load_backbone, save_random_lora
from ray_twist.cli import main
from ray_twist.data import make_task, write_task_jsonl
from ray_twist.features import TaskKey
from ray_twist.lora import RowFactors, write_adapter
from ray_twist.pool import FORMAT_VERSION, Pool, SourceEntry, add_sources, pool_merge_sources

#: tiny-T5 adapters made directly with PEFT, each a layout a pool used to refuse. "regex"
#: targets by a regex string and only the decoder's k and o.
LAYOUTS: dict[str, dict] = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]},
    "rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q", "k", "o"]},
    "pattern": {
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["q", "k", "v", "o", "wi", "wo"],
        "rank_pattern": {"k": 5, "encoder.block.0.layer.0.SelfAttention.q": 3},
        "alpha_pattern": {"wi": 16, "decoder.block.1.layer.0.SelfAttention.o": 0.5},
    },
    "regex": {"r": 3, "lora_alpha": 6, "target_modules": r".*decoder.*\.(k|o)"},
}
WEIGHTS = {"plain": 0.5, "rslora": -0.3, "pattern": 0.9, "regex": 0.4}


def peft_adapter(base: str, out: Path, seed: int, **layout) -> str:
    """An adapter "trained anywhere": PEFT's get_peft_model + save_pretrained, random A, B."""
    torch.manual_seed(seed)
    model = get_peft_model(load_backbone(base).model, LoraConfig(init_lora_weights=False, **layout))
    model.save_pretrained(str(out))
    return str(out)


def peft_deltas(base: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    """{PEFT module path → ΔW} as PEFT itself computes it (its scaling, its patterns)."""
    model = PeftModel.from_pretrained(load_backbone(base).model, adapter_dir)
    return {
        f"base_model.model.{name}": module.get_delta_weight("default").detach().double()
        for name, module in model.base_model.model.named_modules()
        if hasattr(module, "get_delta_weight")
    }


def task_key(seed: int) -> TaskKey:
    style, inp = np.random.default_rng(seed).normal(size=(2, 8))
    return TaskKey(style / np.linalg.norm(style), inp / np.linalg.norm(inp), 10)


def top_q(delta: torch.Tensor, q: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :q] * s[:q]) @ vh[:q]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def mixed(tiny_backbones, tmp_path_factory) -> tuple[str, dict[str, str], dict]:
    """(base, {source → adapter dir}, {source → PEFT's deltas}) for the LAYOUTS."""
    base = tiny_backbones["t5"]
    root = tmp_path_factory.mktemp("mixed")
    dirs = {n: peft_adapter(base, root / n, i, **lay) for i, (n, lay) in enumerate(LAYOUTS.items())}
    return base, dirs, {n: peft_deltas(base, d) for n, d in dirs.items()}


@pytest.fixture
def mixed_pool(mixed, tmp_path) -> Pool:
    base, dirs, _ = mixed
    entries = [SourceEntry(n, d, task_key(i)) for i, (n, d) in enumerate(dirs.items())]
    return add_sources(tmp_path / "pool", entries, base)


def test_mixed_layouts_join_and_load_with_their_own_scaling(mixed, mixed_pool) -> None:
    """Each source's factors reproduce PEFT's delta exactly (rank from the tensors, α from
    alpha_pattern as PEFT matches it, α/√r with rsLoRA); the manifest records each layout."""
    _, _, deltas = mixed
    pool = Pool.open(mixed_pool.uri)
    assert pool.manifest["format_version"] == FORMAT_VERSION == 2
    for name, layout in LAYOUTS.items():
        factors = pool.load_factors(name)
        assert set(factors) == set(deltas[name])
        for module, (a, b) in factors.items():
            torch.testing.assert_close((b @ a).double(), deltas[name][module], rtol=1e-5, atol=1e-7)
        recorded = pool.source_layout(name)
        for field in ("r", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules"):
            want = layout.get(field, {} if "pattern" in field else False)
            assert recorded[field] == (sorted(want) if isinstance(want, list) else want), field
        assert recorded["lora_alpha"] == layout["lora_alpha"]
    q = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
    assert pool.load_factors("pattern")[q][0].shape[0] == 3  # rank_pattern applied
    assert pool.source_layout("regex")["module_names"] == ["k", "o"]
    assert pool.lora_config == {
        "fan_in_fan_out": False,
        "target_modules": ["k", "o", "q", "v", "wi", "wo"],
    }


@pytest.mark.parametrize("order", ["sum_then_truncate", "truncate_then_sum"])
def test_mixed_merge_equals_dense_reference_and_loads_in_peft(
    order, mixed, mixed_pool, tmp_path
) -> None:
    """Σ_s w_s ΔW_s per module (a source without the module adds nothing), from PEFT's own
    deltas, then its top-q SVD (or Σ_s w_s trunc_q(ΔW_s)): the merged adapter, written and
    reloaded by PEFT, targets exactly the union of the sources' modules and gives that delta."""
    base, _, deltas = mixed
    rank = 3
    sources = pool_merge_sources(mixed_pool)
    [merged] = sources.merge([WEIGHTS], rank, merge_order=order)
    union = set().union(*(d.keys() for d in deltas.values()))
    assert set(merged) == union and len(union) > len(deltas["plain"])
    out = write_adapter(tmp_path / "merged", merged, sources.template)
    reloaded = peft_deltas(base, str(out))
    assert set(reloaded) == union  # no untrained module picked up by a suffix match
    for module in sorted(union):
        parts = [(w, deltas[n][module]) for n, w in WEIGHTS.items() if module in deltas[n]]
        if order == "sum_then_truncate":
            ref = top_q(sum(w * d for w, d in parts), rank)
        else:
            ref = sum(w * top_q(d, rank) for w, d in parts)
        a, b = merged[module]
        assert rel(b @ a, ref) < 1e-5, module
        assert rel(reloaded[module], ref) < 1e-5, module


def test_mixed_merge_equals_peft_svd(mixed, mixed_pool) -> None:
    """PEFT 0.21's add_weighted_adapter(combination_type="svd") merges adapters of mixed
    r, α, rsLoRA and rank/alpha patterns, and list target sets of different modules (it
    targets their union and skips an adapter at a module it lacks), but refuses mixing list
    and regex-string target_modules ("all adapter configs should follow the same target
    modules type"): the "regex" source is compared with the dense reference only (above)."""
    base, dirs, _ = mixed
    names = ["plain", "rslora", "pattern"]
    weights = [WEIGHTS[n] for n in names]
    rank = 4
    model = PeftModel.from_pretrained(load_backbone(base).model, dirs[names[0]], names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "svd", combination_type="svd", svd_rank=rank)
    with pytest.raises(ValueError, match="same target modules type"):
        model.load_adapter(dirs["regex"], adapter_name="regex")
        model.add_weighted_adapter([*names, "regex"], [*weights, 1.0], "x", "svd", svd_rank=rank)

    sub = Pool.open(mixed_pool.uri)
    [ours] = pool_merge_sources(sub).merge([dict(zip(names, weights, strict=True))], rank)
    layers = {
        f"base_model.model.{n}": m
        for n, m in model.base_model.model.named_modules()
        if hasattr(m, "get_delta_weight") and "svd" in m.lora_A
    }
    compared = 0
    for module, layer in layers.items():
        a, b = ours[module]
        assert rel(b @ a, layer.get_delta_weight("svd").detach().double()) < 1e-4, module
        compared += 1
    assert compared == len(layers) > 12


@pytest.mark.parametrize(("mode", "order"), [("instance", "sum_then_truncate"),
                                             ("instance", "truncate_then_sum"),
                                             ("mixture", "sum_then_truncate")])  # fmt: skip
def test_mixed_per_row_factors_equal_the_merge(mode, order, mixed, mixed_pool) -> None:
    """Serving and bulk restyling's per-row factors: each row's delta at every module of the
    union equals the dense reference (mixture: the untruncated Σ_s w_s ΔW_s)."""
    _, _, deltas = mixed
    rows_w = [WEIGHTS, {"regex": 1.0}, {"plain": 0.2, "pattern": -0.7}]
    rank = 3
    rows = pool_merge_sources(mixed_pool).rows(rows_w, mode, rank, merge_order=order)
    for module, factors in rows.items():
        d_out, d_in = factors.shape
        eye = torch.eye(d_in).expand(len(rows_w), d_in, d_in)
        got = RowFactors.delta(factors, eye).mT  # row r: ΔW_r
        for r, weights in enumerate(rows_w):
            parts = [(w, deltas[n][module]) for n, w in weights.items() if module in deltas[n]]
            if mode == "mixture":
                ref = sum((w * d for w, d in parts), torch.zeros(d_out, d_in, dtype=torch.float64))
            elif order == "sum_then_truncate":
                ref = top_q(sum((w * d for w, d in parts), torch.zeros(d_out, d_in).double()), rank)
            else:
                ref = sum((w * top_q(d, rank) for w, d in parts), torch.zeros(d_out, d_in).double())
            if not parts:
                assert torch.all(got[r] == 0), module
            else:
                assert rel(got[r], ref) < 1e-5, (module, r)


def test_mixed_rows_hooked_into_the_model_equal_peft_with_the_merged_adapter(
    mixed, mixed_pool, tmp_path
) -> None:
    """What serving and bulk restyling run: the plain model with per-row LoRA hooks, rows of
    different mixed-pool merges in one batch, gives each row the logits PEFT gives with
    that row's merged adapter written and reloaded."""
    base, _, _ = mixed
    rows_w = [WEIGHTS, {"regex": 1.0, "plain": -0.5}]
    sources = pool_merge_sources(mixed_pool)
    rows = sources.rows(rows_w, "instance", 3)
    model = load_backbone(base).model.eval()
    ids = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    dec = torch.randint(5, 100, (2, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(input_ids=ids, decoder_input_ids=dec).logits
        with rows.hooked(model, slice(0, 2)):
            hooked = model(input_ids=ids, decoder_input_ids=dec).logits
    assert (hooked - plain).abs().amax() > 1e-2  # the adapters do change the logits
    for r, weights in enumerate(rows_w):
        [merged] = sources.merge([weights], 3)
        out = write_adapter(tmp_path / f"row{r}", merged, sources.template)
        peft = PeftModel.from_pretrained(load_backbone(base).model, str(out)).eval()
        with torch.no_grad():
            ref = peft(input_ids=ids[r : r + 1], decoder_input_ids=dec[r : r + 1]).logits
        torch.testing.assert_close(hooked[r : r + 1], ref, rtol=1e-4, atol=1e-5)


def test_format_1_pool_still_opens_merges_and_grows(mixed, tmp_path) -> None:
    """A pool written before per-source layouts (format 1, one pool-level "lora") opens and
    merges as before, and a mixed adapter can join it: the new manifest is format 2."""
    base, dirs, deltas = mixed
    root = tmp_path / "pool"
    add_sources(root, [SourceEntry("plain", dirs["plain"], task_key(0))], base)
    manifest = json.loads((root / "pool.json").read_text())
    layout = manifest["sources"]["plain"].pop("lora")
    manifest.update(format_version=1, lora={k: layout[k] for k in
                    ("r", "lora_alpha", "target_modules", "fan_in_fan_out", "use_rslora")})  # fmt: skip
    (root / "pool.json").write_text(json.dumps(manifest))
    old = Pool.open(root)
    assert old.lora_config["r"] == 4 and old.source_layout("plain") == layout
    [merged] = pool_merge_sources(old).merge([{"plain": 1.0}], 4)
    for module, (a, b) in merged.items():
        assert rel(b @ a, deltas["plain"][module]) < 1e-5

    grown = add_sources(root, [SourceEntry("regex", dirs["regex"], task_key(1))], base)
    assert grown.manifest["format_version"] == 2 and grown.generation == 2
    assert grown.manifest["sources"]["plain"]["lora"] == layout
    assert grown.lora_config["target_modules"] == ["k", "o", "q", "v"]


def test_cli_pool_add_takes_an_adapter_trained_anywhere(mixed, tmp_path, capsys) -> None:
    """`twist pool add` of PEFT-made adapters of different r/α/targets, then `twist merge`:
    the written adapter is the dense reference."""
    base, dirs, deltas = mixed
    pool = str(tmp_path / "pool")
    for i, name in enumerate(["plain", "rslora"]):
        corpus = write_task_jsonl(make_task(["pirate", "formal"][i], 8, seed=i),
                                  tmp_path / f"{name}.jsonl")  # fmt: skip
        assert main(["pool", "add", "--pool", pool, "--adapter", dirs[name],
                     "--corpus", corpus, "--name", name]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["pool", "show", "--pool", pool, "--json"]) == 0
    layouts = {n: s["lora"] for n, s in json.loads(capsys.readouterr().out)["sources"].items()}
    assert (layouts["plain"]["r"], layouts["plain"]["lora_alpha"]) == (4, 8)
    assert (layouts["rslora"]["r"], layouts["rslora"]["use_rslora"]) == (8, True)
    weights = {"plain": 0.6, "rslora": 0.4}
    out = tmp_path / "merged"
    assert main(["merge", "--pool", pool, "--weights", json.dumps(weights), "--rank", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    reloaded = peft_deltas(base, str(out))
    assert set(reloaded) == deltas["plain"].keys() | deltas["rslora"].keys()
    for module, got in reloaded.items():
        parts = [w * deltas[n][module] for n, w in weights.items() if module in deltas[n]]
        assert rel(got, top_q(sum(parts), 2)) < 1e-5, module


# ------------------------------------------------------------------ refusals and bad input


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def refused(tiny_backbones, tmp_path_factory) -> dict[str, Path]:
    """Adapter dirs and corpora each `pool add` must refuse, keyed by the case."""
    t5, gpt2 = tiny_backbones["t5"], tiny_backbones["gpt2"]
    root = tmp_path_factory.mktemp("refused")
    good = Path(save_random_lora(t5, root / "good", seed=0, rank=2))
    cases = {
        "dora": Path(peft_adapter(t5, root / "dora", 1, r=2, target_modules=["q"], use_dora=True)),
        "embedding": Path(peft_adapter(t5, root / "embedding", 2, r=2, target_modules=["shared"])),
        "other_base": Path(save_random_lora(gpt2, root / "other_base", seed=3, rank=2)),
    }
    conv = cases["conv"] = root / "conv"  # a 4-D (conv) lora_A, as conv LoRA stores it
    shutil.copytree(good, conv)
    tensors = load_file(str(conv / "adapter_model.safetensors"))
    tensors = {k: v[..., None, None] if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, str(conv / "adapter_model.safetensors"))
    truncated = cases["truncated"] = root / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    no_config = cases["no_config"] = root / "no_config"
    shutil.copytree(good, no_config)
    (no_config / "adapter_config.json").unlink()
    cases["good"] = good
    cases["corpus"] = Path(write_task_jsonl(make_task("pirate", 8, seed=0), root / "c.jsonl"))
    cases["empty_corpus"] = root / "empty.jsonl"
    cases["empty_corpus"].write_text("")
    return cases


@pytest.mark.parametrize(
    ("case", "name", "message"),
    [
        ("dora", "x", r"dora.*DoRA \(use_dora\)"),
        ("embedding", "x", r"embedding.*embedding LoRA.*lora_embedding_A"),
        ("conv", "x", r"conv.*conv LoRA.*lora_A\.weight is 4-D"),
        ("other_base", "x", r"base model config hash mismatch.*other_base.*the pool's base"),
        ("other_base_named", "x", r"other_base/adapter_config\.json names base_model_name_or_path"),
        ("truncated", "x", r"truncated/adapter_model\.safetensors: not a readable safetensors"),
        ("no_config", "x", r"no_config: no adapter_config\.json"),
        ("good", "../evil", r"invalid source name '\.\./evil'"),
        ("good", "a/b", r"invalid source name 'a/b'"),
        ("empty_corpus", "x", r"empty\.jsonl: no examples"),
    ],
)
def test_pool_add_refuses_and_leaves_the_pool_intact(
    case, name, message, refused, tiny_backbones, tmp_path, capsys
) -> None:
    pool = tmp_path / "pool"
    base = tiny_backbones["t5"]
    add_sources(pool, [SourceEntry("good", refused["good"], task_key(0))], base)
    before = snapshot(pool)
    adapter, corpus = refused["good"], refused["corpus"]
    if case == "empty_corpus":
        corpus = refused[case]
    elif case != "good":
        adapter = refused[case.removesuffix("_named")]
    # "other_base_named": the adapter names its GPT-2 base, the user says the pool's T5
    override = ["--base-model", base] if case == "other_base_named" else []
    capsys.readouterr()
    code = main(["pool", "add", "--pool", str(pool), "--adapter", str(adapter),
                 "--corpus", str(corpus), "--name", name, *override])  # fmt: skip
    assert code == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert re.search(message, error), error
    assert snapshot(pool) == before  # nothing written
    assert Pool.open(pool).sources == ["good"]
