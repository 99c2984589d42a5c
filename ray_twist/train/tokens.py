"""Model inputs for (source, target) pairs: tokenised, padded, labels masked for the loss.

Used by the training loop, evaluation (teacher-forced loss) and the CUDA bench.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ray_twist.generation import causal_prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ray_twist.backbone import Family

__all__ = ["IGNORE_INDEX", "tokenize_pairs"]

IGNORE_INDEX = -100


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    family: Family,
    sources: list[str],
    targets: list[str],
    max_source_length: int,
    max_target_length: int,
) -> dict[str, torch.Tensor]:
    """Model inputs with `labels`; padding and (causal) prompt positions are -100 in labels."""
    if family != "causal":
        enc = tokenizer(
            sources,
            max_length=max_source_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        labels = tokenizer(
            text_target=targets,
            max_length=max_target_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )["input_ids"]
        labels[labels == tokenizer.pad_token_id] = IGNORE_INDEX
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
        }
    rows = []
    for source, target in zip(sources, targets, strict=True):
        prompt = causal_prompt_ids(tokenizer, source, max_source_length)
        answer = tokenizer(target, add_special_tokens=False)["input_ids"][: max_target_length - 1]
        answer = [*answer, tokenizer.eos_token_id]
        rows.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
