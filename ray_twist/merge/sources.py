"""The public merge API: a named set of source adapters as one factor stack, merged for many
targets at once.

`MergeSources.merge` gives each target its adapter ({module → (A, B)}, what init,
`merge_targets` and `adapt` write); `MergeSources.rows` gives a batch's rows their per-row
factors (`ray_twist.lora.RowAdapters`, what serving and bulk restyling generate with). Both
run `merge_modules`, the one per-module dispatch over `ray_twist.merge.factored`. The QR
factors of each module's stack (`sum_then_truncate`), each source's own top-q SVD
(`truncate_then_sum`, per q) and the concatenated factors of untruncated mixtures are
computed on first use (or by `prepare`) and kept: every target merged from the same sources
(a pool generation) reuses them.

Top-k merges cost what a k-source pool costs. `sum_then_truncate` batches whose targets each
weight at most `SPARSE_FRACTION` of the sources (non-zero weights, e.g. retrieval's top-k)
build each target's core from its selected sources only (`ray_twist.merge.subset`; modules
of one shape and rank as one batch, `subset_groups`, so a serving batch pays the per-call
overhead of its linear algebra once, not once per module), the others the whole stack's; `truncate_then_sum` and "mixture" rows only touch the columns of
sources some target weights non-zero.

Sources may differ in rank (per module, too) and in the modules they train: the merge covers
the union of their modules, and a source without a module stands in it as a rank-0 block
(A (0, d_in), B (d_out, 0)): no columns in any stack, so it contributes exactly zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from ray_twist.lora.peft_io import AdapterFactors
from ray_twist.lora.rows import ROW_MODES, RowAdapters, RowFactors, RowMode
from ray_twist.merge.factored import (
    DEFAULT_MERGE_ORDER,
    FactorStack,
    MergeMethod,
    MergeOrder,
    TruncatedStack,
    column_weights,
    merge_lora_factors,
    weighted_columns,
)
from ray_twist.merge.subset import SPARSE_FRACTION, SubsetStack, sparse_applies

ModuleFactors = dict[str, tuple[Tensor, Tensor]]
#: the most elements a module group's block-diagonal cross-Gram (Σ N·r_max)² may have
#: (`MergeSources.subset_groups`, by default): 2²² float32, 16 MiB per side; larger pools merge one
#: module at a time, where the per-call overhead a group saves is small against the work
GROUP_GRAM_ELEMENTS = 1 << 22
S = TypeVar("S")


class MergeSources:
    """Source adapters of one base model, in a fixed order; their modules may differ."""

    def __init__(
        self,
        names: list[str],
        adapters: list[AdapterFactors],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        group_gram_elements: int = GROUP_GRAM_ELEMENTS,
    ) -> None:
        if len(names) != len(adapters) or not names:
            raise ValueError("need one name per adapter and at least one adapter")
        # module → its rank-0 block (A (0, d_in), B (d_out, 0)), for sources without it
        self._blank: dict[str, tuple[Tensor, Tensor]] = {}
        for name, adapter in zip(names, adapters, strict=True):
            for module, (a, b) in adapter.modules.items():
                blank = self._blank.setdefault(
                    module, (a.new_zeros(0, a.shape[1]), b.new_zeros(b.shape[0], 0))
                )
                if (blank[1].shape[0], blank[0].shape[1]) != (b.shape[0], a.shape[1]):
                    raise ValueError(
                        f"source {name!r}: module {module} has a {b.shape[0]}x{a.shape[1]} "
                        f"delta, an earlier source {blank[1].shape[0]}x{blank[0].shape[1]}; "
                        "adapters of different base models cannot be merged"
                    )
        self.names = list(names)
        self.adapters = adapters
        self.modules = sorted(self._blank)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.group_gram_elements = group_gram_elements
        self._stacks: dict[str, FactorStack] = {}
        self._truncated: dict[tuple[str, int], TruncatedStack] = {}
        self._subsets: dict[str, SubsetStack] = {}
        self._subset_groups: dict[tuple[str, ...], SubsetStack] = {}
        self._concatenated: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def template(self) -> dict:
        """Adapter config the merged adapters inherit (targets, fan_in_fan_out, task type)."""
        return self.adapters[0].config

    def factors(self, module: str) -> tuple[list[Tensor], list[Tensor]]:
        """Each source's (A_s, B_s) at `module`, rank-0 blocks for sources without it."""
        pairs = [adapter.modules.get(module, self._blank[module]) for adapter in self.adapters]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def _built(self, cache: dict[Any, S], key: Any, module: str, build: Callable[..., S]) -> S:
        """`build(A_list, B_list, dtype=, device=)` of `module`'s factors, cached at `key`:
        the per-pool precomputations every target merged from these sources reuses."""
        if key not in cache:
            a_list, b_list = self.factors(module)
            cache[key] = build(a_list, b_list, dtype=self.dtype, device=self.device)
        return cache[key]

    def stack(self, module: str) -> FactorStack:
        """The module's stacked factors, QR-factored (cached)."""
        return self._built(self._stacks, module, module, FactorStack.from_factors)

    def subset(self, module: str) -> SubsetStack:
        """The module's per-source factors and cross-Grams for top-k merges (cached)."""
        return self._built(self._subsets, module, module, SubsetStack.from_factors)

    @functools.cached_property
    def subset_groups(self) -> list[tuple[str, ...]]:
        """The module groups whose top-k merges run as one batch each (`subset_group`):
        modules of one shape and one largest source rank r, in module order, as many per
        group as keep its block-diagonal cross-Grams within `group_gram_elements`. A module
        in no group (alone in its kind, or r·N over the cap) merges on its own."""
        alike: dict[tuple[int, int, int], list[str]] = {}
        for module in self.modules:
            a, b = self._blank[module]
            r = max(1, *(int(x.shape[0]) for x in self.factors(module)[0]))
            alike.setdefault((int(b.shape[0]), int(a.shape[1]), r), []).append(module)
        groups = []
        for (_, _, r), modules in alike.items():
            size = max(1, int(self.group_gram_elements**0.5) // (len(self.names) * r))
            groups += [tuple(modules[i : i + size]) for i in range(0, len(modules), size)]
        return [group for group in groups if len(group) > 1]

    def subset_group(self, modules: tuple[str, ...]) -> SubsetStack:
        """One `SubsetStack` over the (module, source) pairs of same-shape `modules`: module
        j's source s is source j·N + s, and the cross-Grams are block-diagonal (a target
        selects sources of one module only, so no cross-module block is ever read). Every
        module's targets then merge in one batched pass instead of one pass per module —
        the same per-target maths, at a fraction of the per-call overhead (cached)."""
        if modules not in self._subset_groups:
            stacks = [self.subset(m) for m in modules]
            self._subset_groups[modules] = _stacked_subsets(stacks)
        return self._subset_groups[modules]

    def _merge_subset_groups(self, weights: Tensor, rank: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Rank-q merges of a sparse batch for every module in a group, each group in one
        `SubsetStack.merge_svd` over its modules' targets stacked."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        t = weights.shape[0]
        for modules in self.subset_groups:
            grouped = torch.block_diag(*[weights.to(torch.float64)] * len(modules))
            a_t, b_t = self.subset_group(modules).merge_svd(grouped, rank)
            for j, module in enumerate(modules):
                out[module] = (a_t[j * t : (j + 1) * t], b_t[j * t : (j + 1) * t])
        return out

    def truncated(self, module: str, rank: int) -> TruncatedStack:
        """The module's sources each truncated to top-`rank` SVD, concatenated (cached)."""
        build = functools.partial(TruncatedStack.from_factors, rank=rank)
        return self._built(self._truncated, (module, rank), module, build)

    def concatenated(self, module: str) -> tuple[Tensor, Tensor]:
        """The module's sources' factors side by side, (A_all (K, d_in), B_all (d_out, K)),
        K = Σ r_s, on the sources' device (cached): the untruncated mixtures of `rows`."""
        if module not in self._concatenated:
            a_list, b_list = self.factors(module)
            self._concatenated[module] = (
                torch.cat(a_list).to(self.device),
                torch.cat(b_list, 1).to(self.device),
            )
        return self._concatenated[module]

    def prepare(
        self,
        rank: int,
        merge_order: MergeOrder = DEFAULT_MERGE_ORDER,
        modes: Sequence[RowMode] = ("instance",),
        top_k: int | None = None,
    ) -> None:
        """Compute up front (not inside a first request) what merges at `rank` in
        `merge_order` and `rows` in `modes` need: every module's QR stack, its per-source
        factors and cross-Grams (and the module groups') when `top_k` makes merges sparse,
        each source's top-q SVD for `truncate_then_sum`, the concatenated factors for
        "mixture"."""
        sparse = top_k is not None and top_k <= SPARSE_FRACTION * len(self.names)
        for module in self.modules:
            self.stack(module)
            if sparse and merge_order == "sum_then_truncate":
                self.subset(module)
            if merge_order == "truncate_then_sum":
                self.truncated(module, rank)
            if "mixture" in modes:
                self.concatenated(module)
        if sparse and merge_order == "sum_then_truncate":
            for modules in self.subset_groups:
                self.subset_group(modules)

    def weights_tensor(self, weights: list[dict[str, float]] | Tensor) -> Tensor:
        """(T, N) weights from a tensor or from {source name → weight} dicts (missing = 0)."""
        if isinstance(weights, Tensor):
            return weights
        unknown = sorted({k for w in weights for k in w} - set(self.names))
        if unknown:
            raise ValueError(f"unknown source(s) in weights: {unknown}; known: {self.names}")
        return torch.tensor([[float(w.get(n, 0.0)) for n in self.names] for w in weights])

    def merge_modules(
        self,
        weights: Tensor,
        rank: int,
        method: MergeMethod = "svd",
        merge_order: MergeOrder = DEFAULT_MERGE_ORDER,
    ) -> Iterator[tuple[str, Tensor, Tensor]]:
        """Yield (module, A_t (T,q,d_in), B_t (T,d_out,q)) one module at a time; with
        `truncate_then_sum` the rank is Σ_s min(q, r_s) for every target (see `merge`)."""
        sparse = method == "svd" and sparse_applies(weights, len(self.names))
        grouped = {}
        if sparse and merge_order == "sum_then_truncate":
            grouped = self._merge_subset_groups(weights, rank)
        for module in self.modules:
            if module in grouped:
                a_t, b_t = grouped[module]
            elif method == "dense-svd":
                a_list, b_list = self.factors(module)
                a_t, b_t = merge_lora_factors(
                    a_list, b_list, weights, rank, method=method, merge_order=merge_order
                )
            elif merge_order == "truncate_then_sum":
                a_t, b_t = merge_lora_factors(
                    [], [], weights, rank, method=method, merge_order=merge_order,
                    truncated=self.truncated(module, rank),
                )  # fmt: skip
            elif sparse:
                a_t, b_t = self.subset(module).merge_svd(weights, rank)
            else:
                stack = self.stack(module)
                a_t, b_t = merge_lora_factors([], [], weights, rank, method=method, stack=stack)
            yield module, a_t, b_t

    def merge(
        self,
        weights: list[dict[str, float]] | Tensor,
        rank: int,
        method: MergeMethod = "svd",
        merge_order: MergeOrder = DEFAULT_MERGE_ORDER,
    ) -> list[ModuleFactors]:
        """One {module → (A, B)} per target row of `weights`.

        `sum_then_truncate`: rank q. `truncate_then_sum`: Σ_s R_s trunc_q(ΔW_s) exactly, at
        rank Σ_s min(q, r_s) over the sources this target weights non-zero (the columns of
        the others are zero and left out); modules share that rank (zero-padded to the
        largest if their source ranks differ), at least 1.
        """
        w = self.weights_tensor(weights)
        if merge_order == "truncate_then_sum" and method == "svd":
            return self._merge_truncated(w, rank)
        targets: list[ModuleFactors] = [{} for _ in range(w.shape[0])]
        for module, a_t, b_t in self.merge_modules(w, rank, method, merge_order):
            if merge_order == "truncate_then_sum":  # dense-svd: the rank is the live count
                ranks = tuple(min(rank, int(a.shape[0])) for a in self.factors(module)[0])
                live = column_weights((w != 0).to(torch.int64), ranks).sum(1)
            for t, out in enumerate(targets):
                if merge_order != "truncate_then_sum":
                    out[module] = (a_t[t], b_t[t])
                else:  # SVD order: leading first
                    k = int(live[t])
                    out[module] = (a_t[t, :k], b_t[t, :, :k])
        if merge_order == "truncate_then_sum":
            targets = [_common_rank(out) for out in targets]
        return targets

    def _merge_truncated(self, w: Tensor, rank: int) -> list[ModuleFactors]:
        """`truncate_then_sum` per target from the columns of its non-zero-weight sources
        only (stacking order): the cost follows the target's support, not the pool."""
        targets: list[ModuleFactors] = [{} for _ in range(w.shape[0])]
        for module in self.modules:
            stack = self.truncated(module, rank)
            d = stack.column_weights(w.to(stack.a))
            for t, out in enumerate(targets):
                cols = d[t].nonzero().squeeze(1)
                out[module] = weighted_columns(stack.a[cols], stack.b[:, cols], d[t, cols])
        return [_common_rank(out) for out in targets]

    def rows(
        self,
        weights: list[dict[str, float]] | Tensor,
        mode: RowMode,
        rank: int,
        merge_order: MergeOrder = DEFAULT_MERGE_ORDER,
    ) -> RowAdapters:
        """Per-row factors for (R, N) source weights, stacked as the merge makes them.

        "instance": each row's Σ_s w_s ΔW_s truncated to rank q by SVD (one batched core SVD
        per module) — with `truncate_then_sum`, each row's Σ_s w_s trunc_q(ΔW_s) exactly, as
        the cached truncated stack shared by all rows with per-row column weights (rank
        Σ_s min(q, r_s), no SVD). "mixture": the untruncated Σ_s w_s ΔW_s as the concatenated
        factors with per-row column weights, y = W x + B_all (d_row ⊙ (A_all x)): exact, at
        Σ r_s·(d_in + d_out) extra MACs per token.
        """
        w = self.weights_tensor(weights)
        if mode not in ROW_MODES:
            raise ValueError(f"mode must be one of {ROW_MODES}; got {mode!r}")
        out = RowAdapters()
        if mode == "instance" and merge_order != "truncate_then_sum":
            for module, a_t, b_t in self.merge_modules(w, rank):
                out[module] = RowFactors(a_t, b_t)
            return out
        for module in self.modules:
            if mode == "mixture":
                a, b = self.concatenated(module)
                ranks = tuple(int(x.shape[0]) for x in self.factors(module)[0])
                out[module] = _used_columns(a, b, column_weights(w.to(a), ranks))
            else:
                stack = self.truncated(module, rank)
                out[module] = _used_columns(stack.a, stack.b, stack.column_weights(w.to(stack.a)))
        return out


def _stacked_subsets(stacks: list[SubsetStack]) -> SubsetStack:
    """Same-shape modules' `SubsetStack`s as one over their (module, source) pairs: bases,
    cores and live columns concatenated (one all-zero padding source at the end), the
    cross-Grams block-diagonal (zero between modules: never gathered)."""
    n = stacks[0].n_sources
    grams = []
    for side in ("g_b", "g_a"):
        blocks = [getattr(s, side) for s in stacks]
        gram = blocks[0].new_zeros(len(stacks) * n, len(stacks) * n, *blocks[0].shape[2:])
        for j, block in enumerate(blocks):
            gram[j * n : (j + 1) * n, j * n : (j + 1) * n] = block
        grams.append(gram)
    return SubsetStack(
        torch.cat([s.q_b[:n] for s in stacks] + [stacks[0].q_b[n:]]),
        torch.cat([s.q_a[:n] for s in stacks] + [stacks[0].q_a[n:]]),
        torch.cat([s.cores for s in stacks]),
        grams[0],
        grams[1],
        torch.cat([s.live[:n] for s in stacks] + [stacks[0].live[n:]]),
        tuple(r for s in stacks for r in s.ranks),
    )


def _used_columns(a: Tensor, b: Tensor, scale: Tensor) -> RowFactors:
    """Shared row factors restricted to the columns some row weights non-zero (a top-k
    batch touches its sources' columns only, not the pool's)."""
    used = (scale != 0).any(0)
    if bool(used.all()) or not bool(used.any()):
        return RowFactors(a, b, scale)
    return RowFactors(a[used], b[:, used], scale[:, used])


def _common_rank(modules: ModuleFactors) -> ModuleFactors:
    """Zero-pad every module to the largest rank among them (and to at least 1)."""
    rank = max(1, *(a.shape[0] for a, _ in modules.values()))
    out: ModuleFactors = {}
    for module, (a, b) in modules.items():
        missing = rank - a.shape[0]
        if missing:
            a = torch.cat([a, a.new_zeros(missing, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
        out[module] = (a, b)
    return out
