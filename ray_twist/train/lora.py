"""The PEFT LoRA around a frozen base: wrapping, saving (ZeRO-3 aware), loading from a URI."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ray_twist import storage
from ray_twist.train.config import LoraSettings

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from ray_twist.backbone import Family

__all__ = ["check_adapter_saves", "save_adapter_dir", "wrap_lora"]


def wrap_lora(
    model: PreTrainedModel, family: Family, lora: LoraSettings, init_adapter: str | None = None
) -> PeftModel:
    """Trainable PEFT LoRA around a frozen base; an `init_adapter` dir brings its own config."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    from ray_twist.backbone import default_lora_targets, fan_in_fan_out

    if init_adapter is not None:
        with storage.local_dir(init_adapter) as path:
            return PeftModel.from_pretrained(model, path, is_trainable=True)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or default_lora_targets(model.config),
        fan_in_fan_out=fan_in_fan_out(model.config),
        task_type=TaskType.CAUSAL_LM if family == "causal" else TaskType.SEQ_2_SEQ_LM,
    )
    return get_peft_model(model, config)


def _save_adapter(model: PeftModel, out_dir: Path, zero_stage: int) -> None:
    """PEFT adapter dir with fp32 weights, gathering ZeRO-3 partitions first."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    gather = (
        deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        state = {
            name: param.detach().float().cpu().clone()
            for name, param in model.named_parameters()
            if param.requires_grad
        }
    if torch.distributed.get_rank() == 0:
        save_adapter_dir(model, out_dir, state_dict=state)


def save_adapter_dir(
    model: PeftModel, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """`model.save_pretrained` as every adapter here is saved: safetensors, LoRA weights only.

    `save_embedding_layers=False`: these LoRAs never adapt embeddings, and PEFT's "auto"
    check re-reads the base config for `vocab_size`, which a saved `EncoderDecoderConfig`
    lacks (AttributeError on every BERT2BERT checkpoint).
    """
    model.save_pretrained(
        str(out_dir), state_dict=state_dict, safe_serialization=True, save_embedding_layers=False
    )


def check_adapter_saves(model: PeftModel) -> None:
    """Save the (untrained) adapter once to a temp dir, so that a save that cannot work
    fails before the first training step rather than at the first checkpoint."""
    with tempfile.TemporaryDirectory(prefix="ray-twist-save-check-") as tmp:
        save_adapter_dir(model, tmp)
