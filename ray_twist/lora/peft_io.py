"""PEFT adapter directories ↔ per-module LoRA factors.

Reading folds each module's LoRA scaling (α/r, or α/√r with rsLoRA, honouring PEFT's
rank/alpha patterns) into B, so every consumer sees ΔW = B·A; each module's rank is its
tensors' own, so adapters of any r, α and pattern read alike. What cannot be read as
ΔW = B·A on a linear layer (DoRA, embedding or conv LoRA, extra trained weights) is refused
naming the file. Writing produces a directory `PeftModel.from_pretrained(base, DIR)` loads
unchanged, with lora_alpha = r so that PEFT's scaling is exactly 1 and the stored factors
reproduce the merged delta bit for bit, and with the exact module names as targets (merges
of adapters with different target sets cover their union and nothing more).
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
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import Tensor, nn

from ray_twist import storage
from ray_twist.lora.rows import plain_module_name

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
    """PEFT's scaling of one module: its α (alpha_pattern matched as PEFT matches it, on the
    module's name in the base model) over its rank r (the tensors', so rank_pattern is
    honoured), or over √r with rsLoRA."""
    alpha = config.get("lora_alpha", rank)
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        alpha = pattern.get(get_pattern_key(list(pattern), plain_module_name(module)), alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_weights(data: bytes | str | Path, where: str) -> dict[str, Tensor]:
    """Tensors of a safetensors file (its bytes or its path); a truncated or corrupt file is
    an `AdapterFormatError` naming `where` (safetensors' own error does not name the file)."""
    try:
        raw = data if isinstance(data, bytes) else Path(data).read_bytes()
        return load(raw)
    except (SafetensorError, ValueError, OSError) as exc:
        raise AdapterFormatError(
            f"{where}: not a readable safetensors file (corrupt or truncated?): {exc}"
        ) from None


def check_lora(config: dict[str, Any], tensors: dict[str, Tensor], where: str) -> None:
    """Refuse, naming `where`, any adapter whose weights are not ΔW = B·A on linear layers:
    another PEFT type, DoRA, embedding or conv LoRA, extra weights (biases, modules_to_save)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in tensors):
        raise AdapterFormatError(f"{where}: DoRA (use_dora) cannot be merged as ΔW = B·A")
    embedding = sorted(k for k in tensors if "lora_embedding_" in k)
    if embedding:
        raise AdapterFormatError(
            f"{where}: embedding LoRA (e.g. {embedding[0]}) is not supported; "
            "only LoRA on linear layers is"
        )
    conv = sorted(
        k for k, t in tensors.items() if k.endswith((_A_SUFFIX, _B_SUFFIX)) and t.ndim != 2
    )
    if conv:
        raise AdapterFormatError(
            f"{where}: conv LoRA ({conv[0]} is {tensors[conv[0]].ndim}-D) is not supported; "
            "only LoRA on linear layers is"
        )
    odd = sorted(k for k in tensors if not k.endswith((_A_SUFFIX, _B_SUFFIX)))
    if odd or not tensors:
        raise AdapterFormatError(
            f"{where}: only linear LoRA A/B weights can be merged, found {odd[:3] or 'none'}"
        )


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
    config = read_config(config_path.read_bytes(), str(config_path))
    tensors = load_weights(weights_path, str(weights_path))
    check_lora(config, tensors, str(root))
    return AdapterFactors(config=config, modules=lora_factors(tensors, config, str(weights_path)))


def read_config(data: bytes, where: str) -> dict[str, Any]:
    """An adapter_config.json's fields; not a JSON object → `AdapterFormatError` naming it."""
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where}: not a JSON object")
    return config


def write_adapter(
    out_dir: str | Path,
    modules: dict[str, tuple[Tensor, Tensor]],
    template: dict[str, Any],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write merged factors as a PEFT adapter dir; `template` is a source's adapter config
    (fan_in_fan_out, task type, base model). The targets are the modules' exact names.

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
        target_modules=sorted(plain_module_name(m) for m in modules),
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
