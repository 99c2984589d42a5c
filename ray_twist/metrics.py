"""Scores of restyled outputs: style accuracy, BLEU, G-score, perplexity — per example and overall.

Everything here is pure (no models): given outputs, what they should preserve, and which
outputs were judged to be in the target style, compute the numbers. All percentages are on a
0–100 scale, as in the TWIST paper, so G = √(ACC·BLEU) is on 0–100 too.

Content preservation is BLEU (sacrebleu, 13a tokenisation) against the references — the
test set's target plus any extra `references` — or, when the test set has none, against the
inputs ("self-BLEU"). Both sides are detokenised first (`detokenize`): a WordPiece decode
spaces out apostrophes, hyphens and number punctuation ("don ' t", "well - known", "3 . 5"),
which 13a would otherwise count as different words from the references' "don't". Corpus BLEU is the headline number; per-example sentence BLEU
(sacrebleu's default exponential smoothing) is kept for error analysis, so the mean of the
per-example BLEUs is *not* the corpus BLEU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import sacrebleu

BleuAgainst = Literal["references", "inputs"]


def g_score(acc: float | None, bleu: float | None) -> float | None:
    """√(ACC·BLEU) with both on 0–100; None when either is unknown."""
    if acc is None or bleu is None:
        return None
    return math.sqrt(max(acc, 0.0) * max(bleu, 0.0))


_DETOKENIZE = [
    (re.compile(r"\s+([.,!?;:%)\]}])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[{$])\s+"), r"\1"),  # nor after opening brackets or a currency sign
    (re.compile(r"(\w)\s*'\s*(s|t|re|ve|m|ll|d)\b", re.IGNORECASE), r"\1'\2"),  # don't
    (re.compile(r"(\w)\s+-\s+(?=\w)"), r"\1-"),  # well - known → well-known
    (re.compile(r"(\d)\s*([.,:])\s*(?=\d)"), r"\1\2"),  # 3 . 5 → 3.5, 1 , 000 → 1,000
]


def detokenize(text: str) -> str:
    """Undo a subword decode's spacing (WordPiece: "it ' s well - known ." → "it's
    well-known."); text without such spacing is unchanged but for spaced hyphens."""
    for pattern, repl in _DETOKENIZE:
        text = pattern.sub(repl, text)
    return " ".join(text.split())


def bleu_scores(
    outputs: Sequence[str],
    references: Sequence[Sequence[str]],
    lowercase: bool = False,
    detokenized: bool = True,
) -> tuple[float, list[float]]:
    """(corpus BLEU, per-example sentence BLEU); every example needs ≥1 reference.

    `detokenized`: compare `detokenize`d outputs and references (both sides the same way).
    """
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} reference lists")
    if not outputs:
        raise ValueError("nothing to score: no outputs")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"examples {empty[:5]} have no reference")
    if detokenized:
        outputs = [detokenize(o) for o in outputs]
        references = [[detokenize(r) for r in refs] for refs in references]
    width = max(len(refs) for refs in references)
    # sacrebleu takes one stream per reference slot; None marks a slot an example lacks
    streams: Any = [[r[j] if j < len(r) else None for r in references] for j in range(width)]
    corpus = sacrebleu.corpus_bleu(list(outputs), streams, lowercase=lowercase).score
    per_example = [
        sacrebleu.sentence_bleu(out, list(refs), lowercase=lowercase).score
        for out, refs in zip(outputs, references, strict=True)
    ]
    return float(corpus), [float(b) for b in per_example]


def percent(hits: Sequence[bool]) -> float:
    """Share of True on 0–100."""
    if not hits:
        raise ValueError("no judgements to average")
    return 100.0 * sum(bool(h) for h in hits) / len(hits)


@dataclass
class ExampleScore:
    """One test example: what went in, what came out, and how it was judged."""

    source: str
    output: str
    references: list[str]
    predicted_style: str | None = None
    style_prob: float | None = None
    style_ok: bool | None = None
    rule_ok: bool | None = None
    bleu: float = 0.0
    nll: float | None = None
    tokens: int | None = None


@dataclass
class EvalReport:
    """Overall scores of one adapter on one test set, with every example's scores."""

    style: str | None
    n: int
    bleu: float
    bleu_against: BleuAgainst
    bleu_lowercase: bool = False
    acc: float | None = None
    g: float | None = None
    acc_rule: float | None = None
    g_rule: float | None = None
    perplexity: float | None = None
    classifier_heldout_acc: float | None = None
    notes: list[str] = field(default_factory=list)
    examples: list[ExampleScore] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-example rows (what `twist eval --json` prints)."""
        out = asdict(self)
        out.pop("examples")
        return out


def score(
    outputs: Sequence[str],
    sources: Sequence[str],
    references: Sequence[Sequence[str]] | None,
    style: str | None = None,
    style_ok: Sequence[bool] | None = None,
    predicted: Sequence[str] | None = None,
    style_prob: Sequence[float] | None = None,
    rule_ok: Sequence[bool] | None = None,
    nll: Sequence[tuple[float, int]] | None = None,
    lowercase: bool = False,
) -> EvalReport:
    """Score outputs; `style_ok` (classifier) and `rule_ok` (a rule checker) give ACC and G.

    Without `references`, BLEU is computed against the inputs and a note says so. `nll`
    holds (summed negative log-likelihood, token count) per output for the perplexity.
    """
    n = len(outputs)
    if len(sources) != n:
        raise ValueError(f"{n} outputs but {len(sources)} sources")
    notes: list[str] = []
    against: BleuAgainst = "references"
    refs = [list(r) for r in references] if references is not None else None
    if refs is None:
        against, refs = "inputs", [[s] for s in sources]
        notes.append("the test set has no references: BLEU is measured against the inputs")
    corpus_bleu, sentence_bleu = bleu_scores(outputs, refs, lowercase)

    def column(values: Sequence[Any] | None) -> list[Any]:
        if values is not None and len(values) != n:
            raise ValueError(f"{n} outputs but {len(values)} per-example values")
        return list(values) if values is not None else [None] * n

    acc = percent(style_ok) if style_ok is not None else None
    acc_rule = percent(rule_ok) if rule_ok is not None else None
    perplexity = None
    if nll is not None:
        total, count = sum(x for x, _ in nll), sum(t for _, t in nll)
        perplexity = math.exp(total / max(count, 1))
    columns = zip(
        column(predicted),
        column(style_prob),
        column(style_ok),
        column(rule_ok),
        column(nll),
        strict=True,
    )
    examples = []
    for src, out, r, b, (pred, prob, ok, rule, x) in zip(
        sources, outputs, refs, sentence_bleu, columns, strict=True
    ):
        nll_sum, tokens = x if x is not None else (None, None)
        examples.append(ExampleScore(src, out, r, pred, prob, ok, rule, b, nll_sum, tokens))
    return EvalReport(
        style=style,
        n=n,
        bleu=corpus_bleu,
        bleu_against=against,
        bleu_lowercase=lowercase,
        acc=acc,
        g=g_score(acc, corpus_bleu),
        acc_rule=acc_rule,
        g_rule=g_score(acc_rule, corpus_bleu),
        perplexity=perplexity,
        notes=notes,
        examples=examples,
    )
