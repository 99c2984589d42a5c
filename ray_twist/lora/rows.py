"""Per-row LoRA: rows of one batch, each with its own adapter, in a single forward pass.

`RowLoRA(model)` puts a forward hook on LoRA target modules of a *plain* Hugging Face model
(nn.Linear, or GPT-2's Conv1D, which computes x @ W with W stored (in, out)). For row i of
the batch a hooked module returns

    y_i = base(x_i) + B_i (A_i x_i)                         per-row factors ("instance"), or
    y_i = base(x_i) + B_all (d_i ⊙ (A_all x_i))             shared stack, per-row weights ("mixture")

computed with batched matmuls over all rows at once (torch.bmm / broadcasting), never a
Python loop over rows. A (…, d_in) input is viewed as (n, L, d_in); n must be a multiple k of
the R rows given, and consecutive groups of k inputs belong to one row. That covers what
`generate` does with `num_beams` / `num_return_sequences` > 1 (it repeat_interleaves the
batch) and modules that see the batch flattened row-major to (R·T, d_in).

Factors are keyed by module path; PEFT's saved paths ("base_model.model.<path>") are mapped
to `model.named_modules()` names by stripping that prefix. B carries the LoRA scaling, as
`ray_twist.lora.read_adapter` returns it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

PEFT_PREFIX = "base_model.model."

#: How a row gets its style (serving and bulk restyling): `adapted`, one adapter merged into
#: the weights; `instance`, the row's own retrieval-weighted merge truncated to rank q;
#: `mixture`, the row's untruncated retrieval-weighted sum of the sources.
Mode = Literal["adapted", "instance", "mixture"]
MODES: tuple[Mode, ...] = get_args(Mode)
#: The per-row modes, applied through `RowAdapters`.
RowMode = Literal["instance", "mixture"]
ROW_MODES: tuple[RowMode, ...] = get_args(RowMode)


def plain_module_name(path: str) -> str:
    """PEFT's saved module path → the name in the plain model's `named_modules()`."""
    return path.removeprefix(PEFT_PREFIX)


@dataclass(frozen=True)
class RowFactors:
    """One module's LoRA factors for R rows.

    Per row: `a` (R, q, d_in), `b` (R, d_out, q), `scale` None.
    Mixture: `a` (K, d_in) and `b` (d_out, K) shared by all rows, `scale` (R, K) per-row
    column weights (K = Σ r_s over the stacked sources).
    """

    a: Tensor
    b: Tensor
    scale: Tensor | None = None

    def __post_init__(self) -> None:
        if self.scale is None:
            ok = self.a.ndim == 3 and self.b.ndim == 3 and self.a.shape[0] == self.b.shape[0]
            ok = ok and self.a.shape[1] == self.b.shape[2]
            want = "a (R, q, d_in) and b (R, d_out, q)"
        else:
            ok = self.a.ndim == 2 and self.b.ndim == 2 and self.scale.ndim == 2
            ok = ok and self.a.shape[0] == self.b.shape[1] == self.scale.shape[1]
            want = "a (K, d_in), b (d_out, K) and scale (R, K)"
        if not ok:
            got = [tuple(t.shape) for t in (self.a, self.b, self.scale) if t is not None]
            raise ValueError(f"row factors must be {want}; got shapes {got}")

    @property
    def rows(self) -> int:
        return int(self.a.shape[0] if self.scale is None else self.scale.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the delta."""
        return int(self.b.shape[-2]), int(self.a.shape[-1])

    def to(self, device: torch.device, dtype: torch.dtype) -> RowFactors:
        scale = None if self.scale is None else self.scale.to(device, dtype)
        return RowFactors(self.a.to(device, dtype), self.b.to(device, dtype), scale)

    def select(self, index: Tensor | slice | Sequence[int]) -> RowFactors:
        """The factors of a subset of rows (e.g. one generation batch)."""
        if self.scale is None:
            return RowFactors(self.a[index], self.b[index])
        return RowFactors(self.a, self.b, self.scale[index])

    def delta(self, x: Tensor) -> Tensor:
        """B_row (A_row x) for an input (n, …, d_in) whose n is a multiple of the rows."""
        n, rows = x.shape[0], self.rows
        if n % rows:
            raise ValueError(
                f"batch of {n} does not split into the {rows} rows the LoRA factors were set "
                "for; set one row of factors per input row"
            )
        k = n // rows
        flat = x.reshape(n, -1, x.shape[-1])
        if self.scale is None:
            a, b = (t.repeat_interleave(k, 0) if k > 1 else t for t in (self.a, self.b))
            out = torch.bmm(torch.bmm(flat, a.mT), b.mT)
        else:
            scale = self.scale.repeat_interleave(k, 0) if k > 1 else self.scale
            out = ((flat @ self.a.T) * scale.unsqueeze(1)) @ self.b.T
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _module_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a LoRA-able layer: nn.Linear (out, in) or Conv1D (in, out)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D":
        d_in, d_out = cast(Tensor, module.weight).shape
        return int(d_out), int(d_in)
    raise TypeError(f"{type(module).__name__} is not a LoRA target (nn.Linear or Conv1D)")


class RowLoRA:
    """Forward hooks that add per-row LoRA deltas to a plain (non-PEFT) model.

    Hooks go on the modules named in `set_rows` (added on first use, kept until `remove`);
    a hooked module with no factors set passes its output through unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        if hasattr(model, "peft_config"):
            raise TypeError(
                "RowLoRA needs the plain base model, not a PeftModel "
                "(use the base, or merge_and_unload() first)"
            )
        self.model = model
        self._modules = dict(model.named_modules())
        self._hooks: dict[str, RemovableHandle] = {}
        self._rows: dict[str, RowFactors] = {}

    def set_rows(self, factors: Mapping[str, RowFactors]) -> RowLoRA:
        """Use these per-row factors (keys: PEFT or plain module paths) from now on."""
        rows: dict[str, RowFactors] = {}
        counts = {f.rows for f in factors.values()}
        if len(counts) > 1:
            raise ValueError(f"all modules must be given the same number of rows; got {counts}")
        for path, f in factors.items():
            name = plain_module_name(path)
            module = self._modules.get(name)
            if module is None:
                raise KeyError(f"module {path!r} is not in the model (looked for {name!r})")
            if f.shape != _module_shape(module):
                raise ValueError(
                    f"{name}: factors give a {f.shape} delta; the layer is {_module_shape(module)}"
                )
            weight = module.weight
            rows[name] = f.to(weight.device, weight.dtype)
            if name not in self._hooks:
                self._hooks[name] = module.register_forward_hook(self._hook(name), with_kwargs=True)
        self._rows = rows
        return self

    def clear(self) -> None:
        """Back to the base model (hooks stay, doing nothing)."""
        self._rows = {}

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._rows = {}

    def _hook(self, name: str):
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
        ) -> Tensor | None:
            rows = self._rows.get(name)
            if rows is None:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            return output + rows.delta(x)

        return hook


@contextmanager
def row_lora(model: nn.Module, factors: Mapping[str, RowFactors]) -> Iterator[RowLoRA]:
    """`with row_lora(model, factors):` run the model with per-row LoRA, then unhook."""
    hooks = RowLoRA(model).set_rows(factors)
    try:
        yield hooks
    finally:
        hooks.remove()


class RowAdapters(dict[str, RowFactors]):
    """Per-row LoRA factors by module path, in the form `generation.generate_ids` applies:
    `hooked(model, rows)` runs `model` with the factors of batch rows `rows` hooked in."""

    def hooked(self, model: nn.Module, rows: slice) -> AbstractContextManager[Any]:
        return row_lora(model, {name: f.select(rows) for name, f in self.items()})

    def select(self, index: Tensor | slice | Sequence[int]) -> RowAdapters:
        """The factors of a subset of rows, every module."""
        return RowAdapters({name: f.select(index) for name, f in self.items()})


def concat_rows(blocks: Sequence[Mapping[str, RowFactors]]) -> RowAdapters:
    """Blocks of per-row factors (each with `scale` None) as one set, rows in block order, so
    rows styled in different ways share a forward pass: ranks are zero-padded to the largest,
    and a module a block leaves out is zero for its rows. One block comes back as it is."""
    if not blocks:
        raise ValueError("need at least one block of rows")
    if any(f.scale is not None for block in blocks for f in block.values()):
        raise ValueError("only per-row factors (scale None) concatenate; shared stacks do not")
    modules = sorted({m for block in blocks for m in block})
    ranks = {m: max(b[m].a.shape[1] for b in blocks if m in b) for m in modules}
    if len(blocks) == 1 and all(blocks[0][m].a.shape[1] == ranks[m] for m in blocks[0]):
        return RowAdapters(blocks[0])
    rows = [next(iter(block.values())).rows for block in blocks]
    out = RowAdapters()
    for m in modules:
        like, q = next(b[m] for b in blocks if m in b), ranks[m]
        a_parts, b_parts = [], []
        for block, n in zip(blocks, rows, strict=True):
            f = block.get(m)
            if f is None:
                f = RowFactors(like.a.new_zeros(n, q, like.a.shape[2]),
                               like.b.new_zeros(n, like.b.shape[1], q))  # fmt: skip
            pad = q - f.a.shape[1]  # a copy only where the rank falls short
            a_parts.append(nn.functional.pad(f.a, (0, 0, 0, pad)) if pad else f.a)
            b_parts.append(nn.functional.pad(f.b, (0, pad)) if pad else f.b)
        out[m] = RowFactors(torch.cat(a_parts), torch.cat(b_parts))
    return out


def per_row_factors(
    adapters: Sequence[Mapping[str, tuple[Tensor, Tensor]]],
) -> RowAdapters:
    """One adapter per row ({module → (A (r×d_in), B (d_out×r))}, e.g. `read_adapter(d).modules`
    or a `MergeSources.merge` target). Ranks may differ: smaller ones are zero-padded."""
    if not adapters:
        raise ValueError("need at least one row")
    modules = set(adapters[0])
    for i, adapter in enumerate(adapters):
        if set(adapter) != modules:
            raise ValueError(f"row {i} has different LoRA modules than row 0")
    return concat_rows([adapter_rows(adapter, 1) for adapter in adapters])


def adapter_rows(adapter: Mapping[str, tuple[Tensor, Tensor]], rows: int) -> RowAdapters:
    """One adapter for `rows` rows of a batch, as per-row factors."""
    return RowAdapters(
        {
            m: RowFactors(a.unsqueeze(0).repeat(rows, 1, 1), b.unsqueeze(0).repeat(rows, 1, 1))
            for m, (a, b) in sorted(adapter.items())
        }
    )
