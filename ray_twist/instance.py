"""Per-sentence TWIST over a weight pool: every input row gets its own LoRA.

The one implementation of pool-backed per-row styling, shared by serving
(`ray_twist.serve.engine`) and bulk restyling (`ray_twist.restyle`), so a row restyled in
bulk is restyled exactly as the same row sent to the server:

1. featurize each input with the pool's featurizer;
2. instance retrieval weights R_x over the pool's sources (`ray_twist.retrieval`; λ, τ,
   top-k): the input is the weight-level query, and the task-level query is a named
   style's key or, without one, the input itself;
3. per row, the rank-q truncated SVD of Σ_s R_s ΔW_s ("instance", paper-faithful; one
   batched core SVD per module for all rows, from the pool's cached QR factors) — or, with
   `merge_order: truncate_then_sum`, Σ_s R_s trunc_q(ΔW_s) from each source's cached top-q
   SVD (no SVD per row; rank Σ_s min(q, r_s), see `ray_twist.merge`) — or the untruncated
   Σ_s R_s ΔW_s over the stacked factors ("mixture", which no merge order affects);
4. those as `RowFactors` for `ray_twist.generation.generate_ids`, which hooks them into the
   plain base model (`ray_twist.lora.rows`) and decodes all rows of a batch in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ray_twist.features import Featurizer
from ray_twist.lora import ROW_MODES, RowAdapters, RowMode
from ray_twist.merge import ModuleFactors
from ray_twist.merge.rows import MixtureStack, instance_factors
from ray_twist.pool import Pool, pool_merge_sources
from ray_twist.retrieval import InstanceRetrievalSettings, instance_retrieval


def weight_dicts(names: Sequence[str], weights: np.ndarray) -> list[dict[str, float]]:
    """(T, N) weights → per row {source → weight}, sources outside the top-k (0) left out."""
    return [{n: float(w) for n, w in zip(names, row, strict=True) if w > 0} for row in weights]


class InstanceStyler:
    """Retrieval, merges and per-row factors for one pool (and one base model's device).

    Build once (per replica or actor): it loads every source's factors, computes the QR
    factors of each module's stack up front (not inside the first batch) and, when
    "mixture" is among `modes`, the concatenated stacks. `style_keys` adds styles beyond the
    pool's sources (e.g. a registered style's key from its examples) that rows may name.
    """

    def __init__(
        self,
        pool: Pool,
        settings: InstanceRetrievalSettings | None = None,
        device: str | torch.device | None = None,
        featurizer: Featurizer | None = None,
        style_keys: Mapping[str, np.ndarray] | None = None,
        modes: Sequence[RowMode] = ROW_MODES,
    ) -> None:
        self.pool, self.settings = pool, settings or InstanceRetrievalSettings()
        where = None if device is None else str(device)
        self.featurizer = featurizer or Featurizer(pool.featurizer, device=where)
        self.sources = pool_merge_sources(pool, device)
        for module in self.sources.modules:
            self.sources.stack(module)
        if self.settings.merge_order == "truncate_then_sum":  # each source's top-q SVD, once
            self.sources.prepare(self.settings.rank, self.settings.merge_order)
        self.device = device
        self._mixture = MixtureStack(self.sources, device) if "mixture" in modes else None
        self.style_keys = {name: pool.style_keys[i] for i, name in enumerate(pool.sources)}
        self.style_keys.update(style_keys or {})

    @property
    def names(self) -> list[str]:
        """The pool's sources: the columns of every weights array."""
        return self.pool.sources

    def weights(self, texts: list[str], styles: Sequence[str | None] | None = None) -> np.ndarray:
        """(T, N) source weights, one row per text; `styles[i]` (a key of `style_keys`)
        makes that style the row's task-level query, None the text itself."""
        styles = [None] * len(texts) if styles is None else list(styles)
        if len(styles) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(styles)} styles")
        unknown = sorted({s for s in styles if s is not None and s not in self.style_keys})
        if unknown:
            raise ValueError(f"unknown style(s) {unknown}; known: {sorted(self.style_keys)}")
        emb = self.featurizer.encode(texts)
        query = np.stack([self.style_keys[s] if s else e for s, e in zip(styles, emb, strict=True)])
        p = self.settings
        return instance_retrieval(self.pool, emb, p.lam, p.tau, p.top_k, style_query=query)

    def merged(self, weights: np.ndarray) -> list[ModuleFactors]:
        """Per row {module → (A, B)}: the rank-q merge in the settings' merge order, one
        batched core SVD per module for all rows with `sum_then_truncate` (as adapters, to mix
        with named adapters in `per_row_factors`; `row_factors` gives the same merges already
        stacked)."""
        p = self.settings
        return self.sources.merge(torch.from_numpy(weights).float(), p.rank, "svd", p.merge_order)

    def mixture_rows(self, weights: np.ndarray) -> RowAdapters:
        """Per-row factors of the untruncated mixtures Σ_s w_s ΔW_s."""
        if self._mixture is None:
            self._mixture = MixtureStack(self.sources, self.device)
        return self._mixture.rows(torch.from_numpy(weights).float())

    def row_factors(self, weights: np.ndarray, mode: RowMode = "instance") -> RowAdapters:
        """Per-row factors for `generate_ids` in either mode."""
        if mode == "mixture":
            return self.mixture_rows(weights)
        if mode != "instance":
            raise ValueError(f"mode must be one of {ROW_MODES}; got {mode!r}")
        p, w = self.settings, torch.from_numpy(weights).float()
        return instance_factors(self.sources, w, p.rank, p.merge_order)

    def __call__(
        self, texts: list[str], style: str | None = None, mode: RowMode = "instance"
    ) -> tuple[RowAdapters, list[dict[str, float]]]:
        """Texts → (per-row factors, per-row {source → weight}); one style for all rows."""
        weights = self.weights(texts, [style] * len(texts))
        return self.row_factors(weights, mode), weight_dicts(self.names, weights)
