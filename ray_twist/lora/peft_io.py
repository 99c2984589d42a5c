"""PEFT adapter directories ↔ per-module LoRA factors.

Reading folds each module's LoRA scaling (α/r, or α/√r with rsLoRA, honouring PEFT's
rank/alpha patterns) into B, so every consumer sees ΔW = B·A. Writing produces a directory
`PeftModel.from_pretrained(base, DIR)` loads unchanged, with lora_alpha = r so that PEFT's
scaling is exactly 1 and the stored factors reproduce the merged delta bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ray_twist import storage

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


class AdapterFormatError(ValueError):
    """The directory is not a safetensors PEFT LoRA adapter we can read."""


@dataclass
class AdapterFactors:
    """A LoRA adapter as {module path → (A (r×d_in), B (d_out×r) with scaling applied)}."""

    config: dict[str, Any]
    modules: dict[str, tuple[Tensor, Tensor]]

    @property
    def target_modules(self) -> list[str]:
        targets = self.config.get("target_modules") or []
        return sorted([targets] if isinstance(targets, str) else targets)


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = config.get("lora_alpha", rank)
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        alpha = pattern.get(get_pattern_key(list(pattern), module), alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_factors(
    tensors: dict[str, Tensor], config: dict[str, Any], where: str
) -> dict[str, tuple[Tensor, Tensor]]:
    """{module → (A, B·scaling)} from a PEFT LoRA state dict; `where` names it in errors."""
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    for key in sorted(tensors):
        if not key.endswith(_A_SUFFIX):
            continue
        module = key[: -len(_A_SUFFIX)]
        b = tensors.get(module + _B_SUFFIX)
        if b is None:
            raise AdapterFormatError(f"{where}: {key} has no matching lora_B")
        a = tensors[key]
        modules[module] = (a.float(), b.float() * _scaling(config, module, a.shape[0]))
    if not modules:
        raise AdapterFormatError(f"{where}: no LoRA weights (lora_A/lora_B) found")
    return modules


def read_adapter(adapter_dir: str | Path) -> AdapterFactors:
    """Load a PEFT LoRA adapter directory (safetensors only) into scaled factors."""
    root = Path(adapter_dir)
    config_path, weights_path = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise AdapterFormatError(f"{root}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    if not weights_path.is_file():
        hint = " (pickled adapter_model.bin is refused; re-save with safetensors)"
        raise AdapterFormatError(f"{root}: no {ADAPTER_WEIGHTS}{hint}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(
            f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA"
        )
    if config.get("use_dora"):
        raise AdapterFormatError(f"{config_path}: DoRA adapters cannot be merged as ΔW = B·A")
    modules = lora_factors(load_file(str(weights_path)), config, str(weights_path))
    return AdapterFactors(config=config, modules=modules)


def write_adapter(
    out_dir: str | Path,
    modules: dict[str, tuple[Tensor, Tensor]],
    template: dict[str, Any],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write merged factors as a PEFT adapter dir; `template` is a source's adapter config.

    All modules must share one rank q (the merge pads to it), stored with lora_alpha = q.
    """
    out = Path(out_dir)
    ranks = {a.shape[0] for a, _ in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"merged modules must share one rank; got {sorted(ranks)}")
    rank = ranks.pop()
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=template.get("target_modules"),
        fan_in_fan_out=bool(template.get("fan_in_fan_out", False)),
        bias="none",
        task_type=template.get("task_type"),
        base_model_name_or_path=template.get("base_model_name_or_path"),
        lora_dropout=float(template.get("lora_dropout", 0.0)),
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors: dict[str, Tensor] = {}
    for module, (a, b) in modules.items():
        tensors[module + _A_SUFFIX] = a.detach().to("cpu", dtype).contiguous()
        tensors[module + _B_SUFFIX] = b.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def apply_adapter(model: nn.Module, adapter_dir: str | Path, merge: bool = True) -> Any:
    """`model` running one PEFT adapter (a dir or URI) on every row, in eval mode: merged
    into its weights (`merge`, PEFT's `merge_and_unload`: no per-token cost; bulk restyling's
    adapted mode) or attached (a `PeftModel`, whose `disable_adapter()` gives back the base
    model: evaluation scores the base model's perplexity with it).

    Generation applies adapters in two ways, on purpose: this one, for one adapter shared by
    every row, and per-row LoRA hooks (`ray_twist.lora.rows`) for rows of one batch with
    different adapters (serving, pool modes), which PEFT cannot run in one forward pass.
    Hooks for a single adapter would add B(Ax) at every layer on every token and differ from
    PEFT's merged weights in the last bits, changing bulk-restyle outputs.
    """
    with storage.local_dir(adapter_dir) as local:
        peft = PeftModel.from_pretrained(model, local)
        return (peft.merge_and_unload() if merge else peft).eval()
