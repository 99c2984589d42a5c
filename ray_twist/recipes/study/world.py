"""The synthetic world's base model: a tiny T5 over the world's own vocabulary, pre-trained to
copy neutral sentences — the stand-in for a pretrained LM, so that LoRAs learn styles."""

from __future__ import annotations

import random
from pathlib import Path

from ray_twist.data.synthetic import STYLES, apply_style, neutral_sentences
from ray_twist.recipes.study.config import WorldBackboneSettings

__all__ = ["build_world_backbone"]

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _world_vocabulary(seed: int) -> list[str]:
    """WordPiece vocabulary covering every neutral and styled sentence the world produces."""
    from transformers import AutoTokenizer

    from ray_twist.backbone import packaged_minilm_path

    minilm = AutoTokenizer.from_pretrained(packaged_minilm_path())
    pieces: set[str] = set()
    for sentence in neutral_sentences(2000, seed=seed):
        for text in [sentence, *(apply_style(style, sentence) for style in STYLES)]:
            pieces.update(minilm.tokenize(text))
    return _SPECIAL_TOKENS + sorted(pieces)


def build_world_backbone(out_dir: str, spec: WorldBackboneSettings) -> str:
    """The synthetic world's base model at `out_dir` (built once; a finished dir is reused).

    A T5 with a ~200-token vocabulary, fully trained for `pretrain_steps` to copy neutral
    sentences: the copying is what a pretrained LM brings, the styles are left to LoRAs.
    """
    import torch
    from transformers import BertTokenizer, T5Config, T5ForConditionalGeneration

    from ray_twist.backbone import _prepare_tokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return str(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.txt").write_text("\n".join(_world_vocabulary(spec.seed)) + "\n")
    tokenizer = _prepare_tokenizer(BertTokenizer(str(tmp / "vocab.txt"), do_lower_case=True))
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=spec.d_model,
        d_ff=4 * spec.d_model,
        d_kv=max(spec.d_model // 4, 1),
        num_layers=spec.num_layers,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        **{"decoder_start_token_id": tokenizer.pad_token_id},  # not in T5Config's signature
    )
    torch.manual_seed(spec.seed)
    model = T5ForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    rng = random.Random(spec.seed)
    corpus = neutral_sentences(5000, seed=spec.seed + 1)
    model.train()
    for _ in range(spec.pretrain_steps):
        batch = rng.sample(corpus, spec.batch_size)
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)
