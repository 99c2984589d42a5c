"""The untrained starting point of a base build: a BERT2BERT warm start, vocabulary trimmed.

The decoder's cross-attention and LM-head transform are new (random) here; the build then
trains every weight. Trimming keeps the word pieces the training texts use plus every
single character (so unseen words still spell out rather than become [UNK]): WordPiece
matches the longest piece in the vocabulary, and every piece those texts matched is kept,
so the texts tokenise exactly as before while the output layer shrinks by half or more.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["used_token_ids", "warm_start"]


def used_token_ids(tokenizer: Any, texts: Iterable[str]) -> set[int]:
    """Ids of every word piece that tokenising `texts` produces."""
    used: set[int] = set()
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        used.update(ids)
    return used


def _kept_ids(tokenizer: Any, used: set[int]) -> list[int]:
    """Used pieces, special tokens and every single character (with and without ##)."""
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        i
        for i, piece in enumerate(pieces)
        if i in used or i in special or len(piece.removeprefix("##")) == 1
    ]


def _trim_embeddings(model: Any, keep: torch.Tensor) -> None:
    """Keep rows `keep` of both word embeddings and of the (tied) LM head and its bias."""
    encoder_emb = model.encoder.get_input_embeddings()
    encoder_emb.weight = torch.nn.Parameter(encoder_emb.weight.detach()[keep].clone())
    encoder_emb.num_embeddings = len(keep)
    decoder_emb = model.decoder.get_input_embeddings()
    decoder_emb.weight = torch.nn.Parameter(decoder_emb.weight.detach()[keep].clone())
    decoder_emb.num_embeddings = len(keep)
    predictions = model.decoder.cls.predictions  # BertLMPredictionHead: bias tied to decoder's
    predictions.bias = torch.nn.Parameter(predictions.decoder.bias.detach()[keep].clone())
    predictions.decoder.bias = predictions.bias
    predictions.decoder.weight = decoder_emb.weight
    predictions.decoder.out_features = len(keep)
    for config in (model.config.encoder, model.config.decoder):
        config.vocab_size = len(keep)


def warm_start(from_model: str, out_dir: str | Path, used: set[int] | None, seed: int) -> str:
    """Save the BERT2BERT warm start of `from_model` at `out_dir` (trimmed to `used` ids when
    given); return its path. Seeded: the same inputs give the same starting weights."""
    from transformers import BertTokenizer

    from ray_twist.backbone import load_backbone, resolve_model_path

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return str(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = load_backbone(resolve_model_path(from_model))
    model, tokenizer = backbone.model, backbone.tokenizer
    if model.config.model_type != "encoder-decoder":
        raise ValueError(
            f"--from {from_model!r} is a {model.config.model_type} model; base build "
            "warm-starts an encoder-decoder from a BERT-family encoder"
        )
    if used is not None:
        keep = _kept_ids(tokenizer, used)
        pieces = tokenizer.convert_ids_to_tokens(keep)
        (tmp / "vocab.txt").write_text("\n".join(pieces) + "\n")
        tokenizer = BertTokenizer(
            str(tmp / "vocab.txt"), do_lower_case=getattr(tokenizer, "do_lower_case", True)
        )
        _trim_embeddings(model, torch.tensor(keep))
        model.config.decoder_start_token_id = tokenizer.cls_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.sep_token_id
        model.config.vocab_size = len(keep)
        gen = model.generation_config
        gen.decoder_start_token_id = tokenizer.cls_token_id
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = tokenizer.sep_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)
