"""DeepSpeed set-up: the engine's JSON config and its process group."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from ray_twist.train.config import DeepSpeedSettings, TrainingSettings

__all__ = ["deepspeed_config"]


def deepspeed_config(
    settings: DeepSpeedSettings, training: TrainingSettings, world_size: int, on_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed JSON config. On CPU, torch's AdamW replaces the JIT-built fused Adam."""
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    optimizer_params: dict[str, Any] = {"lr": training.lr, "weight_decay": 0.0}
    if not on_gpu and not settings.offload_optimizer:
        optimizer_params["torch_adam"] = True
    schedule: dict[str, Any] = {}
    if training.lr_schedule == "linear":
        schedule = {"scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": training.lr, "warmup_type": "linear",
            "warmup_num_steps": training.warmup_steps, "total_num_steps": training.max_steps}}}  # fmt: skip
    elif training.warmup_steps:
        schedule = {"scheduler": {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": training.lr, "warmup_type": "linear",
            "warmup_num_steps": training.warmup_steps}}}  # fmt: skip
    return {
        **schedule,
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": training.batch_size * world_size,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.precision == "bf16"},
        "fp16": {"enabled": settings.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _init_process_group() -> None:
    """DeepSpeed's process group: Ray Train's own, or (local mode, `num_workers: 0`) a
    one-process gloo/NCCL group, kept for later runs in the same Ray worker process."""
    import deepspeed

    if torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False
        )
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )  # fmt: skip
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
