"""A named set of source adapters, merged per module for many targets at once.

The QR factors of each module's stack are computed on first use and kept: every target
merged from the same sources (a pool generation) reuses them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ray_twist.merge.factored import FactorStack, MergeMethod, merge_lora_factors
from ray_twist.merge.peft_io import AdapterFactors

ModuleFactors = dict[str, tuple[Tensor, Tensor]]


class MergeSources:
    """Source adapters sharing one base model and target modules, in a fixed order."""

    def __init__(
        self,
        names: list[str],
        adapters: list[AdapterFactors],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(names) != len(adapters) or not names:
            raise ValueError("need one name per adapter and at least one adapter")
        modules = set(adapters[0].modules)
        for name, adapter in zip(names, adapters, strict=True):
            if set(adapter.modules) != modules:
                diff = sorted(set(adapter.modules) ^ modules)[:3]
                raise ValueError(
                    f"source {name!r} has different LoRA modules than {names[0]!r} "
                    f"(e.g. {diff}); all sources must share target modules"
                )
        self.names = list(names)
        self.adapters = adapters
        self.modules = sorted(modules)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._stacks: dict[str, FactorStack] = {}

    @property
    def template(self) -> dict:
        """Adapter config the merged adapters inherit (targets, fan_in_fan_out, task type)."""
        return self.adapters[0].config

    def factors(self, module: str) -> tuple[list[Tensor], list[Tensor]]:
        pairs = [adapter.modules[module] for adapter in self.adapters]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def stack(self, module: str) -> FactorStack:
        if module not in self._stacks:
            a_list, b_list = self.factors(module)
            self._stacks[module] = FactorStack.from_factors(
                a_list, b_list, dtype=self.dtype, device=self.device
            )
        return self._stacks[module]

    def weights_tensor(self, weights: list[dict[str, float]] | Tensor) -> Tensor:
        """(T, N) weights from a tensor or from {source name → weight} dicts (missing = 0)."""
        if isinstance(weights, Tensor):
            return weights
        unknown = sorted({k for w in weights for k in w} - set(self.names))
        if unknown:
            raise ValueError(f"unknown source(s) in weights: {unknown}; known: {self.names}")
        return torch.tensor([[float(w.get(n, 0.0)) for n in self.names] for w in weights])

    def merge_modules(
        self, weights: Tensor, rank: int, method: MergeMethod = "svd"
    ) -> Iterator[tuple[str, Tensor, Tensor]]:
        """Yield (module, A_t (T,q,d_in), B_t (T,d_out,q)) one module at a time."""
        for module in self.modules:
            if method == "dense-svd":
                a_list, b_list = self.factors(module)
                a_t, b_t = merge_lora_factors(a_list, b_list, weights, rank, method=method)
            else:
                stack = self.stack(module)
                a_t, b_t = merge_lora_factors([], [], weights, rank, method=method, stack=stack)
            yield module, a_t, b_t

    def merge(
        self, weights: list[dict[str, float]] | Tensor, rank: int, method: MergeMethod = "svd"
    ) -> list[ModuleFactors]:
        """One {module → (A, B)} per target row of `weights`."""
        w = self.weights_tensor(weights)
        targets: list[ModuleFactors] = [{} for _ in range(w.shape[0])]
        for module, a_t, b_t in self.merge_modules(w, rank, method):
            for t, out in enumerate(targets):
                out[module] = (a_t[t], b_t[t])
        return targets
