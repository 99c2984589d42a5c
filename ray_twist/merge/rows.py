"""Per-row merges for per-row LoRA (`ray_twist.lora.rows`): every row of a batch its own
retrieval-weighted mixture of the sources, truncated (instance mode) or not (mixture mode)."""

from __future__ import annotations

import torch
from torch import Tensor

from ray_twist.lora.rows import RowAdapters, RowFactors
from ray_twist.merge.factored import DEFAULT_MERGE_ORDER, MergeOrder
from ray_twist.merge.sources import MergeSources

__all__ = ["MixtureStack", "instance_factors"]


def instance_factors(
    sources: MergeSources,
    weights: Tensor | list[dict[str, float]],
    rank: int,
    merge_order: MergeOrder = DEFAULT_MERGE_ORDER,
) -> RowAdapters:
    """Paper-faithful per-row adapters: each row's Σ_s w_s ΔW_s, truncated to rank q by SVD.

    `truncate_then_sum`: each row's Σ_s w_s trunc_q(ΔW_s), exactly, as the sources' cached
    truncated factors shared by all rows with per-row column weights (the mixture form over
    rank Σ_s min(q, r_s); no per-row factors, no SVD).
    """
    w = sources.weights_tensor(weights)
    if merge_order == "truncate_then_sum":
        out = RowAdapters()
        for module in sources.modules:
            stack = sources.truncated(module, rank)
            out[module] = RowFactors(stack.a, stack.b, stack.column_weights(w.to(stack.a)))
        return out
    merged = sources.merge_modules(w, rank, method="svd")
    return RowAdapters({m: RowFactors(a, b) for m, a, b in merged})


class MixtureStack:
    """The sources' factors concatenated once per module, for untruncated per-row mixtures.

    `rows(weights)` gives y = W x + B_all (d_row ⊙ (A_all x)) with d_row each row's source
    weights repeated over that source's rank: exactly Σ_s w_s ΔW_s, at Σr_s·(d_in + d_out)
    extra MACs per token. Build it once (it holds the stacks) and reuse it for every batch.
    """

    def __init__(self, sources: MergeSources, device: torch.device | str | None = None) -> None:
        self.sources = sources
        self._stacks: dict[str, tuple[Tensor, Tensor]] = {}
        for module in sources.modules:
            a_list, b_list = sources.factors(module)
            self._stacks[module] = (torch.cat(a_list).to(device), torch.cat(b_list, 1).to(device))

    def rows(self, weights: Tensor | list[dict[str, float]]) -> RowAdapters:
        """Per-row factors for source weights (R, N) (or {source → weight} dicts)."""
        w = self.sources.weights_tensor(weights)
        return RowAdapters(
            {
                module: RowFactors(a, b, self.sources.stack(module).column_weights(w.to(a)))
                for module, (a, b) in self._stacks.items()
            }
        )
