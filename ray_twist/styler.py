"""The one path from input rows to restyled text, shared by serving and bulk restyling.

Serving (`ray_twist.serve.engine`) and bulk restyling (`ray_twist.restyle`) both hand a
`Styler` their rows as `Part`s — rows that share a mode, a style and decoding settings (a
serving request, a restyle batch) — so a row restyled in bulk is restyled exactly as the same
row sent to the server. `Styler.run`:

1. retrieval, for the rows of pool modes ("instance", "mixture"), in one pass: featurize each
   input with the pool's featurizer, then instance retrieval weights R_x over the pool's
   sources (`ray_twist.retrieval`; λ, τ, top-k); the input is the weight-level query, and
   the task-level query is a named style's key; a row without a style is retrieved at the
   instance level alone (λ applied as 0: a sentence is no style shift, see
   `ray_twist.retrieval`);
2. per-row LoRA factors (`ray_twist.lora.RowAdapters`), built stacked and never split per
   row: "instance" rows get the rank-q truncated SVD of Σ_s R_s ΔW_s (one batched core SVD
   per module for every instance row of the call, from the pool's cached QR factors) — or,
   with `merge_order: truncate_then_sum` (the styler's default or a part's own), Σ_s R_s
   trunc_q(ΔW_s) over each source's cached top-q SVD (no SVD per row) — and "mixture" rows
   the untruncated Σ_s R_s ΔW_s over the
   stacked factors; "adapted" rows run their named adapter (or, without one, the model as
   loaded: bulk restyling merges its one adapter in with `ray_twist.lora.apply_adapter`);
3. one `generate_ids` per group of rows that can share a forward pass: rows are split only
   by factor form (explicit per-row factors, each shared stack, none) and decoding settings.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ray_twist.backbone import Backbone
from ray_twist.features import Featurizer
from ray_twist.generation import GenerationSettings, TokenWatch, generate_ids
from ray_twist.lora import (
    ROW_MODES,
    Mode,
    RowAdapters,
    RowMode,
    adapter_rows,
    concat_rows,
    row_lora,
)
from ray_twist.merge import MergeOrder, ModuleFactors
from ray_twist.pool import Pool, pool_merge_sources
from ray_twist.retrieval import InstanceRetrievalSettings, instance_retrieval


def weight_dicts(names: Sequence[str], weights: np.ndarray) -> list[dict[str, float]]:
    """(T, N) weights → per row {source → weight}, sources outside the top-k (0) left out."""
    return [{n: float(w) for n, w in zip(names, row, strict=True) if w > 0} for row in weights]


@dataclass
class Part:
    """Rows that share a mode, a style and decoding settings.

    `style` names the task-level query of pool modes (a key of `Styler.style_keys`; None: the
    instance level alone). `retrieval` replaces the styler's settings (λ, τ, top-k, rank,
    merge order) for this part's rows (a serving request's own); `merge_order` overrides
    either for instance-mode rows. `adapter` is an adapted-mode row's named adapter;
    `factors` are per-row factors the caller brings (e.g. a restyle `row_styler`), used
    instead of retrieval. `watch` follows the part's rows token by token (a streamed
    request; rows numbered within the part).
    """

    texts: list[str]
    ids: list[list[int]]
    mode: Mode
    settings: GenerationSettings
    style: str | None = None
    adapter: ModuleFactors | None = None
    factors: RowAdapters | None = None
    merge_order: MergeOrder | None = None
    retrieval: InstanceRetrievalSettings | None = None
    watch: TokenWatch | None = None


@dataclass(frozen=True)
class Styled:
    """A part's outputs, and its (rows, N) source weights in pool modes (else None)."""

    outputs: list[str]
    weights: np.ndarray | None


@dataclass(frozen=True)
class Stages:
    """Seconds a `run` spent retrieving, building factors (merges) and generating."""

    retrieval_s: float
    merge_s: float
    generate_s: float


@dataclass
class _Group:
    parts: list[int]
    settings: GenerationSettings
    factors: RowAdapters | None


class Styler:
    """A loaded base model and, optionally, a weight pool: parts of rows → restyled text.

    With a pool it loads every source's factors once, computes the QR factors of each
    module's stack up front (not inside the first batch) and, for each of `modes` that needs
    one, the concatenated or truncated stacks. `style_keys` adds styles beyond the pool's
    sources (e.g. a registered style's key from its examples) that parts may name;
    `merge_orders` are orders parts may ask for beyond the settings' own, prepared up front.
    """

    def __init__(
        self,
        backbone: Backbone,
        pool: Pool | None = None,
        settings: InstanceRetrievalSettings | None = None,
        device: str | torch.device | None = None,
        featurizer: Featurizer | None = None,
        style_keys: Mapping[str, np.ndarray] | None = None,
        modes: Sequence[RowMode] = ROW_MODES,
        merge_orders: Sequence[MergeOrder] = (),
    ) -> None:
        self.backbone, self.pool = backbone, pool
        self.settings = settings or InstanceRetrievalSettings()
        self.style_keys: dict[str, np.ndarray] = {}
        if pool is None:
            return
        where = None if device is None else str(device)
        self.featurizer = featurizer or Featurizer(pool.featurizer, device=where)
        self.sources = pool_merge_sources(pool, device)
        for order in dict.fromkeys([self.settings.merge_order, *merge_orders]):
            self.sources.prepare(self.settings.rank, order, modes, self.settings.top_k)
        self.style_keys = {name: pool.style_keys[i] for i, name in enumerate(pool.sources)}
        self.style_keys.update(style_keys or {})

    @property
    def names(self) -> list[str]:
        """The pool's sources: the columns of every weights array."""
        return self.pool.sources if self.pool is not None else []

    def weights(
        self,
        texts: list[str],
        styles: Sequence[str | None] | None = None,
        settings: InstanceRetrievalSettings | None = None,
    ) -> np.ndarray:
        """(T, N) source weights, one row per text; `styles[i]` (a key of `style_keys`)
        makes that style the row's task-level query; None scores the row at the instance
        level alone (`ray_twist.retrieval.applied_lambda`). `settings` (λ, τ, top-k)
        replace the styler's."""
        if self.pool is None:
            raise ValueError("instance and mixture modes need a weight pool; this styler has none")
        styles = [None] * len(texts) if styles is None else list(styles)
        if len(styles) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(styles)} styles")
        unknown = sorted({s for s in styles if s is not None and s not in self.style_keys})
        if unknown:
            raise ValueError(f"unknown style(s) {unknown}; known: {sorted(self.style_keys)}")
        emb = self.featurizer.encode(texts)
        p = settings or self.settings
        out = np.zeros((len(texts), len(self.names)))
        styled = np.array([s is not None for s in styles], dtype=bool)
        if styled.any():
            query = np.stack([self.style_keys[s] for s in styles if s is not None])
            out[styled] = instance_retrieval(
                self.pool, emb[styled], p.lam, p.tau, p.top_k, style_query=query
            )
        if not styled.all():
            out[~styled] = instance_retrieval(self.pool, emb[~styled], p.lam, p.tau, p.top_k)
        return out

    def row_factors(
        self,
        weights: np.ndarray,
        mode: RowMode = "instance",
        merge_order: MergeOrder | None = None,
        rank: int | None = None,
    ) -> RowAdapters:
        """Per-row factors of a pool mode for (T, N) source weights (`MergeSources.rows`), in
        `merge_order` at `rank` (None: the settings')."""
        p = self.settings
        order = merge_order or p.merge_order
        return self.sources.rows(torch.from_numpy(weights).float(), mode, rank or p.rank, order)

    def settings_of(self, part: Part) -> InstanceRetrievalSettings:
        """The retrieval settings of a part's rows: its own, else the styler's."""
        return part.retrieval or self.settings

    def merge_order(self, part: Part) -> MergeOrder:
        """The merge order of a part's instance-mode rows: its own, else its settings'."""
        return part.merge_order or self.settings_of(part).merge_order

    def check_adapter(self, adapter: ModuleFactors) -> None:
        """Raise (KeyError, ValueError) if a named adapter does not fit the base model."""
        with row_lora(self.backbone.model, adapter_rows(adapter, 1)):
            pass

    def run(
        self, parts: Sequence[Part], batch_size: int | None = None
    ) -> tuple[list[Styled], Stages]:
        """Restyle every part: one retrieval pass, one merge pass, then one `generate_ids` per
        group (`batch_size` rows per forward pass; None: the whole group in one)."""
        start = time.perf_counter()
        weights = self._retrieve(parts)
        retrieved = time.perf_counter()
        groups = self._groups(parts, weights)
        merged = time.perf_counter()
        outputs: list[list[str]] = [[] for _ in parts]
        for group in groups:
            ids = [row for i in group.parts for row in parts[i].ids]
            watch = _Watches.of([parts[i] for i in group.parts])
            texts = generate_ids(
                self.backbone, ids, group.settings, batch_size or len(ids), group.factors, watch
            )
            for i in group.parts:
                outputs[i], texts = texts[: len(parts[i].ids)], texts[len(parts[i].ids) :]
        done = time.perf_counter()
        stages = Stages(retrieved - start, merged - retrieved, done - merged)
        return [Styled(o, w) for o, w in zip(outputs, weights, strict=True)], stages

    def _retrieve(self, parts: Sequence[Part]) -> list[np.ndarray | None]:
        """Per part, (rows, N) source weights (None unless a pool mode without given factors)."""
        need = [
            i for i, p in enumerate(parts) if p.mode != "adapted" and p.factors is None and p.ids
        ]
        out: list[np.ndarray | None] = [None] * len(parts)
        by_settings: dict[tuple[float, float, int | None], list[int]] = {}
        for i in need:  # one pass per distinct (λ, τ, top-k); usually one
            p = self.settings_of(parts[i])
            by_settings.setdefault((p.lam, p.tau, p.top_k), []).append(i)
        for members in by_settings.values():
            texts = [t for i in members for t in parts[i].texts]
            styles = [parts[i].style for i in members for _ in parts[i].texts]
            every = self.weights(texts, styles, self.settings_of(parts[members[0]]))
            offsets = np.cumsum([0] + [len(parts[i].texts) for i in members])
            for k, i in enumerate(members):
                out[i] = every[offsets[k] : offsets[k + 1]]
        return out

    def _form(self, index: int, part: Part) -> Hashable:
        """What a part's rows need to share a forward pass with other rows: explicit per-row
        factors mix; each shared stack (mixture, truncate_then_sum), none, or given factors
        keep to themselves."""
        if part.factors is not None:
            return ("given", index)
        if part.mode == "adapted":
            return "explicit" if part.adapter is not None else "none"
        if part.mode == "instance" and self.merge_order(part) != "truncate_then_sum":
            return "explicit"
        if part.mode == "instance":  # the truncate_then_sum stack of its rank
            return ("instance", self.settings_of(part).rank)
        return part.mode

    def _groups(self, parts: Sequence[Part], weights: list[np.ndarray | None]) -> list[_Group]:
        """Parts grouped by (factor form, decoding settings), each group's factors built."""
        keyed: dict[tuple[Hashable, GenerationSettings], list[int]] = {}
        for i, part in enumerate(parts):
            if part.ids:
                keyed.setdefault((self._form(i, part), part.settings), []).append(i)
        # one batched merge per rank for every explicit instance row, sliced per part below
        by_rank: dict[int, list[int]] = {}
        for (form, _), group in keyed.items():
            for i in group:
                if form == "explicit" and parts[i].mode == "instance":
                    by_rank.setdefault(self.settings_of(parts[i]).rank, []).append(i)
        slices: dict[int, RowAdapters] = {}
        for rank, merged in by_rank.items():
            stacked = _stacked(weights, merged)
            every = self.row_factors(stacked, "instance", "sum_then_truncate", rank)
            offsets = np.cumsum([0] + [len(parts[i].ids) for i in merged])
            for k, i in enumerate(merged):
                slices[i] = every.select(slice(int(offsets[k]), int(offsets[k + 1])))
        groups = []
        for (form, settings), members in keyed.items():
            factors: RowAdapters | None = None
            if form == "explicit":
                blocks = [slices[i] if i in slices else _adapter_rows(parts[i]) for i in members]
                factors = concat_rows(blocks)
            elif isinstance(form, tuple) and form[0] == "instance":
                stacked = _stacked(weights, members)
                factors = self.row_factors(stacked, "instance", "truncate_then_sum", form[1])
            elif form == "mixture":
                factors = self.row_factors(_stacked(weights, members), "mixture")
            elif form != "none":
                factors = parts[members[0]].factors
            groups.append(_Group(members, settings, factors))
        return groups


class _Watches:
    """The token watches of a group's parts as one over the group's rows (parts in order)."""

    def __init__(self, spans: list[tuple[int, int, TokenWatch]]) -> None:
        self.spans = spans  # (first row, rows, the part's watch)

    @classmethod
    def of(cls, parts: Sequence[Part]) -> _Watches | None:
        offsets = np.cumsum([0] + [len(p.ids) for p in parts])
        spans = [(int(offsets[k]), len(p.ids), p.watch) for k, p in enumerate(parts)
                 if p.watch is not None]  # fmt: skip
        return cls(spans) if spans else None

    def step(self, start: int, tokens: list[int]) -> None:
        for first, n, watch in self.spans:
            lo, hi = max(first, start), min(first + n, start + len(tokens))
            if lo < hi:
                watch.step(lo - first, tokens[lo - start : hi - start])

    def stopped(self, start: int, count: int) -> list[bool]:
        out = [False] * count
        for first, n, watch in self.spans:
            lo, hi = max(first, start), min(first + n, start + count)
            if lo < hi:
                out[lo - start : hi - start] = watch.stopped(lo - first, hi - lo)
        return out


def _stacked(weights: list[np.ndarray | None], parts: list[int]) -> np.ndarray:
    """The weights of these parts' rows, one array (every one is a pool-mode part)."""
    return np.concatenate([w for i in parts if (w := weights[i]) is not None])


def _adapter_rows(part: Part) -> RowAdapters:
    if part.adapter is None:
        raise RuntimeError("an adapted part in an explicit group has no adapter")  # a bug
    return adapter_rows(part.adapter, len(part.ids))
