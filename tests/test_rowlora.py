"""Per-row LoRA equals PEFT running each row alone: logits and greedy generations, all families."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from ray_twist.backbone import (
    Backbone,
    load_backbone,
    save_random_lora,
)
from ray_twist.generation import (
    causal_prompt,
    causal_prompt_ids,
    encode,
    generate,
    pad_inputs,
)
from ray_twist.lora import RowFactors, per_row_factors, read_adapter, row_lora, write_adapter
from ray_twist.lora.rows import RowLoRA
from ray_twist.merge import MergeSources

KINDS = ["t5", "gpt2", "llama", "bert2bert"]
TEXTS = [
    "the weather is nice today and we walk to the river",
    "hello",
    "she said that the meeting would start late",
]
RANKS = [2, 4, 3]  # different ranks per row: per-row factors are zero-padded to 4
WEIGHTS = torch.tensor([[0.6, 0.3, 0.1], [-0.5, 1.0, 0.25], [0.2, 0.2, 0.6]])


def _peft_backbone(base: str, adapter_dir: str) -> Backbone:
    backbone = load_backbone(base)
    backbone.model = PeftModel.from_pretrained(backbone.model, adapter_dir).eval()
    return backbone


def _forward(backbone: Backbone, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the mask of real (non-pad) positions, for a padded batch."""
    causal = backbone.family == "causal"
    ids, mask = pad_inputs(encode(backbone, texts), backbone.tokenizer.pad_token_id, left=causal)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if causal:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        real = mask.bool()
    else:  # the same decoder prefix for every row
        decoder = torch.tensor([[0, 2000, 2010, 2020, 2030]]).repeat(len(texts), 1)
        decoder[:, 0] = backbone.model.generation_config.decoder_start_token_id
        kwargs["decoder_input_ids"] = decoder
        real = torch.ones_like(decoder, dtype=torch.bool)
    with torch.inference_mode():
        return backbone.model(**kwargs).logits, real


def _check_rows(
    base: str, factors: dict[str, RowFactors], reference_dirs: list[str], num_beams: int = 1
) -> float:
    """Batched per-row run vs each row alone through PEFT; returns the largest logit gap."""
    backbone = load_backbone(base)
    with row_lora(backbone.model, factors):
        logits, real = _forward(backbone, TEXTS)
    outputs = generate(backbone, TEXTS, max_new_tokens=8, row_factors=factors)
    beams = generate(backbone, TEXTS, max_new_tokens=6, num_beams=num_beams, row_factors=factors)
    worst = 0.0
    for r, adapter_dir in enumerate(reference_dirs):
        ref = _peft_backbone(base, adapter_dir)
        ref_logits, _ = _forward(ref, TEXTS[r : r + 1])
        ours = logits[r][real[r]]
        torch.testing.assert_close(ours, ref_logits[0], atol=1e-5, rtol=1e-5)
        worst = max(worst, float((ours - ref_logits[0]).abs().max()))
        assert outputs[r] == generate(ref, TEXTS[r : r + 1], max_new_tokens=8)[0]
        alone = generate(ref, TEXTS[r : r + 1], max_new_tokens=6, num_beams=num_beams)
        assert beams[r] == alone[0]
    return worst


@pytest.fixture(scope="module")
def adapters(tiny_backbones, tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("row_adapters")
    return {
        kind: [
            save_random_lora(tiny_backbones[kind], root / kind / f"s{i}", seed=10 + i, rank=r)
            for i, r in enumerate(RANKS)
        ]
        for kind in KINDS
    }


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_its_own_adapter_matches_peft(kind: str, tiny_backbones, adapters) -> None:
    dirs = adapters[kind]
    factors = per_row_factors([read_adapter(d).modules for d in dirs])
    assert {f.a.shape[1] for f in factors.values()} == {max(RANKS)}
    _check_rows(tiny_backbones[kind], factors, dirs, num_beams=2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["mixture", "instance"])
def test_merged_rows_match_peft_of_the_merge(
    kind: str, mode: str, tiny_backbones, adapters, tmp_path
) -> None:
    """mixture = the exact Σ w_s ΔW_s per row; instance = its rank-q SVD per row."""
    sources = MergeSources(["a", "b", "c"], [read_adapter(d) for d in adapters[kind]])
    rank = 3
    factors = sources.rows(WEIGHTS, mode, rank)
    method = "linear" if mode == "mixture" else "svd"
    refs = []
    for r in range(len(TEXTS)):
        [merged] = sources.merge(WEIGHTS[r : r + 1], rank, method=method)
        refs.append(str(write_adapter(tmp_path / f"row{r}", merged, sources.template)))
    _check_rows(tiny_backbones[kind], factors, refs)


def test_flattened_inputs_conv1d_and_errors(tiny_backbones, tmp_path) -> None:
    """Row-major flattened inputs map to their rows; wrong batch sizes and shapes are named."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 4, 3)
    x = torch.randn(2, 6, 5)
    expected = torch.stack([x[i] @ a[i].T @ b[i].T for i in range(2)])
    rows = RowFactors(a, b)
    torch.testing.assert_close(rows.delta(x.reshape(12, 5)).reshape(2, 6, 4), expected)
    torch.testing.assert_close(rows.delta(x), expected)
    with pytest.raises(ValueError, match="does not split into the 2 rows"):
        rows.delta(torch.randn(3, 5))
    with pytest.raises(ValueError, match="row factors must be"):
        RowFactors(a, b[:, :, :2])

    model = load_backbone(tiny_backbones["gpt2"]).model  # c_attn is Conv1D (in, out)
    hooks = RowLoRA(model)
    d_in = model.config.n_embd
    with pytest.raises(ValueError, match="delta; the layer is"):
        hooks.set_rows({"transformer.h.0.attn.c_attn": RowFactors(a, b)})
    with pytest.raises(KeyError, match="not in the model"):
        hooks.set_rows({"base_model.model.nope": RowFactors(a, b)})
    layer = model.transformer.h[0].attn.c_attn
    a2, b2 = torch.randn(2, 3, d_in), torch.randn(2, 3 * d_in, 3)
    x2 = torch.randn(2, 4, d_in)
    base = layer(x2)
    hooks.set_rows({"base_model.model.transformer.h.0.attn.c_attn": RowFactors(a2, b2)})
    torch.testing.assert_close(layer(x2), base + RowFactors(a2, b2).delta(x2))
    hooks.clear()
    torch.testing.assert_close(layer(x2), base)
    hooks.remove()
    adapter = save_random_lora(tiny_backbones["gpt2"], tmp_path / "a", seed=0, rank=2)
    with pytest.raises(TypeError, match="plain base model"):
        RowLoRA(PeftModel.from_pretrained(model, adapter))


def test_causal_prompt_text_and_ids_agree(tiny_backbones) -> None:
    tok = load_backbone(tiny_backbones["gpt2"]).tokenizer
    source = "the cat sat on the mat"
    text_ids = tok(causal_prompt(source, tok), add_special_tokens=False)["input_ids"]
    assert text_ids == causal_prompt_ids(tok, source)
    assert causal_prompt_ids(tok, source, max_length=3)[-1] == tok.sep_token_id
    assert len(causal_prompt_ids(tok, source, max_length=3)) == 3
