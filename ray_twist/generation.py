"""Batched text generation for every backbone family, optionally with per-row adapters.

Model inputs:
- seq2seq / encoder-decoder: the tokenizer's own encoding of the text (special tokens
  included), right-padded; truncation keeps the closing special token.
- causal (decoder-only): the prompt `source<sep>` — the source's tokens without special
  tokens, then the tokenizer's sep token (eos when it has none) — left-padded so every row's
  continuation starts at the same position; the prompt is cut from the output. Training
  formats a causal pair as this prompt followed by the target's tokens and eos, so import
  `causal_prompt_ids` (or `causal_prompt`, its text form) rather than re-deriving it.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation import BaseStreamer, StoppingCriteria, StoppingCriteriaList

from ray_twist.backbone import Backbone


class RowAdapter(Protocol):
    """Every input row its own adapter (`ray_twist.lora.RowAdapters` is one): `hooked(model,
    rows)` is a context in which `model` runs the adapters of batch rows `rows`."""

    def hooked(self, model: Any, rows: slice) -> AbstractContextManager[Any]: ...


class TokenWatch(Protocol):
    """Follows input rows while they decode (serving's token streams), rows counted over the
    whole `generate_ids` call: `step(start, tokens)` gets the new token of rows `start`,
    `start + 1`, ... after each decoding step (called on the decoding thread); rows for which
    `stopped(start, count)` says True stop decoding early (their client left), so a batch
    whose rows have all stopped ends its forward passes."""

    def step(self, start: int, tokens: list[int]) -> None: ...

    def stopped(self, start: int, count: int) -> list[bool]: ...


class _Streamer(BaseStreamer):
    """Hands a chunk's new tokens to a `TokenWatch` (the first `put` is the prompt, or an
    encoder-decoder's start tokens, and is skipped)."""

    def __init__(self, watch: TokenWatch, start: int) -> None:
        self.watch, self.start, self.prompt_seen = watch, start, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.watch.step(self.start, value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Stopped(StoppingCriteria):
    """Stops the rows of a chunk that a `TokenWatch` no longer wants."""

    def __init__(self, watch: TokenWatch, start: int) -> None:
        self.watch, self.start = watch, start

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stopped = self.watch.stopped(self.start, input_ids.shape[0])
        return torch.tensor(stopped, dtype=torch.bool, device=input_ids.device)


_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]'])")
_SPACE_AFTER = re.compile(r"([(\[']) ")
_SPACED_PROBE = "a; b-c (d) e's"


@lru_cache(maxsize=8)
def _spaces_punctuation(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the decoder loses the text's spacing around punctuation (probed once per
    tokenizer, not per batch)."""
    probe = str(tokenizer.decode(tokenizer(_SPACED_PROBE)["input_ids"], skip_special_tokens=True))
    return probe.strip().lower() != _SPACED_PROBE


def detokenise(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> list[str]:
    """Decode rows of token ids to text. WordPiece decoders put spaces around every
    punctuation piece (`caesar ' s ; well - known`); for those tokenizers the spaces that the
    text could not have had are removed, so outputs read as text and BLEU's tokenizer sees
    the same words as in the references."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if not _spaces_punctuation(tokenizer):
        return [t.strip() for t in texts]
    joined = (_SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", t)) for t in texts)
    return [t.replace(" - ", "-").strip() for t in joined]


def _sep(tokenizer: PreTrainedTokenizerBase) -> tuple[str, int]:
    if tokenizer.sep_token is not None:
        return tokenizer.sep_token, tokenizer.sep_token_id
    return tokenizer.eos_token, tokenizer.eos_token_id


def causal_prompt(source: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The causal prompt as text, `source<sep>`; encodes (without special tokens) to
    `causal_prompt_ids`."""
    return f"{source}{_sep(tokenizer)[0]}"


def causal_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, source: str, max_length: int | None = None
) -> list[int]:
    """Token ids of `source<sep>`; a too-long source is cut so the separator always stays."""
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    if max_length is not None:
        ids = ids[: max_length - 1]
    return [*ids, _sep(tokenizer)[1]]


def encode(backbone: Backbone, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    """The token ids the model reads for each text (truncated to `max_length` when given)."""
    tok = backbone.tokenizer
    if not texts:
        return []
    if backbone.family == "causal":
        return [causal_prompt_ids(tok, text, max_length) for text in texts]
    return tok(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options shared by `generate`, bulk restyling and serving."""

    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p)
        return out


def pad_inputs(ids: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) tensors; causal models are padded on the left."""
    width = max(len(row) for row in ids)
    padded, mask = [], []
    for row in ids:
        fill = [pad_id] * (width - len(row))
        ones, zeros = [1] * len(row), [0] * len(fill)
        padded.append(fill + row if left else row + fill)
        mask.append(zeros + ones if left else ones + zeros)
    return torch.tensor(padded), torch.tensor(mask)


@torch.inference_mode()
def generate_ids(
    backbone: Backbone,
    input_ids: list[list[int]],
    settings: GenerationSettings = GenerationSettings(),  # noqa: B008 (frozen)
    batch_size: int = 32,
    row_factors: RowAdapter | None = None,
    watch: TokenWatch | None = None,
) -> list[str]:
    """Decode outputs for already-encoded inputs (see `encode`), `batch_size` rows at a time.

    `row_factors` gives every input row its own LoRA (rows of the factors = rows of input).
    `watch` sees every row's tokens as they are generated and may stop rows early
    (transformers streams no beam search, so it needs `num_beams` 1).
    """
    if watch is not None and settings.num_beams != 1:
        raise ValueError("a token watch (streaming) needs num_beams=1")
    model, tok = backbone.model, backbone.tokenizer
    causal = backbone.family == "causal"
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(input_ids), batch_size):
        chunk = input_ids[start : start + batch_size]
        ids, mask = pad_inputs(chunk, tok.pad_token_id, left=causal)
        kwargs = settings.kwargs() | {"pad_token_id": tok.pad_token_id}
        if watch is not None:
            kwargs["streamer"] = _Streamer(watch, start)
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Stopped(watch, start)])
        hooks: AbstractContextManager[Any] = nullcontext()
        if row_factors is not None:
            hooks = row_factors.hooked(model, slice(start, start + len(chunk)))
        with hooks:
            out = model.generate(  # type: ignore[operator]
                input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
            )
        if causal:
            out = out[:, ids.shape[1] :]
        outputs.extend(detokenise(tok, out))
    return outputs


def generate(
    backbone: Backbone,
    texts: list[str],
    max_new_tokens: int = 32,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_input_tokens: int = 128,
    batch_size: int = 32,
    row_factors: RowAdapter | None = None,
) -> list[str]:
    """Restyle `texts` with the backbone as loaded (merge an adapter in, or pass per-row
    `row_factors`); inputs longer than `max_input_tokens` are truncated."""
    settings = GenerationSettings(max_new_tokens, num_beams, do_sample, temperature, top_p)
    ids = encode(backbone, texts, max_input_tokens)
    return generate_ids(backbone, ids, settings, batch_size, row_factors)
