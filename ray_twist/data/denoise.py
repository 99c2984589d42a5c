"""Non-parallel style text → denoising pairs (input = corrupted text, target = original).

A style with no parallel data can still train a source LoRA: the model learns to restore
text *in that style* from a corrupted copy, which teaches it the style's vocabulary and
word order. Corruption works on whitespace-separated words, in this order:

1. **word dropout** — each word is deleted independently with probability `dropout`;
   if every word would go, one randomly chosen word is kept.
2. **local shuffle** — word i gets the key i + u, u ~ Uniform[0, shuffle_window + 1),
   and words are sorted by key, so each word moves at most `shuffle_window` positions
   (0 disables shuffling). This is the noise model of Lample et al. (2018).
3. **masking** — each remaining word is replaced by `mask_token` with probability
   `mask_prob`.

Non-empty input never gives an empty output. Everything is driven by the `random.Random`
passed in, so a seed fixes the result.
"""

from __future__ import annotations

import random
from typing import Any

from ray_twist.data.task import Task


def corrupt(
    text: str,
    rng: random.Random,
    dropout: float = 0.1,
    shuffle_window: int = 3,
    mask_prob: float = 0.1,
    mask_token: str = "[MASK]",
) -> str:
    """A noisy copy of `text` (dropout, then local shuffle, then masking)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if shuffle_window < 0:
        raise ValueError(f"shuffle_window must be >= 0, got {shuffle_window}")
    if not mask_token.strip():
        raise ValueError("mask_token must be a non-blank string")
    words = text.split()
    if not words:
        return text
    kept = [w for w in words if rng.random() >= dropout]
    if not kept:
        kept = [rng.choice(words)]
    keys = [i + rng.uniform(0, shuffle_window + 1) for i in range(len(kept))]
    shuffled = [w for _, w in sorted(zip(keys, kept, strict=True), key=lambda kw: kw[0])]
    return " ".join(mask_token if rng.random() < mask_prob else w for w in shuffled)


def denoising_task(
    texts: list[str], name: str, seed: int = 0, split: str = "train", **corruption: Any
) -> Task:
    """A Task whose sources are corrupted copies of `texts` and targets the texts themselves.

    `corruption` is passed to `corrupt` (dropout, shuffle_window, mask_prob, mask_token).
    """
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"texts[{i}] is empty or not a string")
    rng = random.Random(seed)
    return Task(
        name=name,
        sources=[corrupt(t, rng, **corruption) for t in texts],
        targets=list(texts),
        split=split,
    )
