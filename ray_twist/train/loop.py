"""The per-worker training loop: LoRA + DeepSpeed steps with checkpoint/resume.

The loop trains a PEFT LoRA around the frozen base, or (no `lora` settings) every weight of
the base itself: `twist base build` trains its seq2seq base with this same loop.

Checkpoints (every `checkpoint_every_steps` and at the end) hold
    adapter/              PEFT adapter dir (rank 0; fp32 safetensors), or
    model/                the whole model, a plain HF model dir (full training)
    trainer_state.json    step, epoch, position in the epoch, history, early-stopping state
    deepspeed/            the engine's own checkpoint: LoRA weights + (ZeRO-sharded) optimizer
and a restarted worker group resumes from the latest one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ray_twist.train.config import DeepSpeedSettings, TrainingSettings
from ray_twist.train.deepspeed_config import _init_process_group, deepspeed_config
from ray_twist.train.failures import setup_phase
from ray_twist.train.lora import _save_adapter, check_adapter_saves, wrap_lora
from ray_twist.train.tokens import IGNORE_INDEX, tokenize_pairs

if TYPE_CHECKING:
    from ray.data import DataIterator

__all__ = [
    "ADAPTER_DIR",
    "DS_DIR",
    "DS_TAG",
    "MODEL_DIR",
    "STATE_FILE",
    "train_loop_per_worker",
]

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"
DS_TAG = "state"


@dataclass
class _State:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0
    best_val_loss: float | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def _mean_across_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.item() / torch.distributed.get_world_size()


def _broadcast_from_rank0(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.broadcast(tensor, src=0)
    return tensor.item()


def _save_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """The whole model as a plain HF model dir (rank 0; ZeRO ≤ 2 keeps full weights)."""
    if torch.distributed.get_rank() == 0:
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker body: LoRA + DeepSpeed training with checkpoint/resume.

    `config` keys: base_model, lora (settings, or None to train every weight), training,
    deepspeed (settings models), init_adapter (dir or None). Returns (rank 0's value is
    kept) the full step history and engine facts, so the driver needs no metrics store.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks an accelerator
    import deepspeed
    import ray.train

    from ray_twist.backbone import load_backbone

    training: TrainingSettings = config["training"]
    ds_settings: DeepSpeedSettings = config["deepspeed"]
    torch.manual_seed(training.seed)

    full = config["lora"] is None
    with setup_phase():  # errors here recur on every attempt: the run fails, no restart
        allow_untrained = config.get("allow_untrained_base", True)
        backbone = load_backbone(config["base_model"], allow_untrained=allow_untrained)
        model: Any = (
            backbone.model.requires_grad_(True)
            if full
            else wrap_lora(backbone.model, backbone.family, config["lora"], config["init_adapter"])
        )
        if not full:
            check_adapter_saves(model)
    model.train()

    on_gpu = torch.cuda.is_available()
    _init_process_group()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(ds_settings, training, world, on_gpu),
    )
    engine_facts = {
        "engine_class": type(engine).__name__,
        "zero_stage": int(engine.zero_optimization_stage()),
        "optimizer_class": type(engine.optimizer).__name__,
        "world_size": world,
    }

    state = _State()
    resumed_from_step: int | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(
                os.path.join(ckpt_dir, DS_DIR), tag=DS_TAG, load_module_strict=False
            )
            state = _State(**json.loads(Path(ckpt_dir, STATE_FILE).read_text()))
        resumed_from_step = state.step

    def collate(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = tokenize_pairs(
            backbone.tokenizer,
            backbone.family,
            list(batch["source"]),
            list(batch["target"]),
            training.max_source_length,
            training.max_target_length,
        )
        return {k: v.to(engine.device) for k, v in inputs.items()}

    local_checkpoints: list[str] = []

    def report_checkpoint(extra: dict[str, Any]) -> None:
        """Save a checkpoint and report it with the latest metrics.

        Ray Train V2 consumes reports at its poll interval (seconds), so per-step
        metrics go to `state.history` (in the checkpoint and the return value) and only
        checkpoints are reported.
        """
        metrics = {**(state.history[-1] if state.history else {}), **engine_facts, **extra}
        metrics["resumed_from_step"] = resumed_from_step
        tmp = tempfile.mkdtemp(prefix="ray-twist-checkpoint-")
        engine.save_checkpoint(
            os.path.join(tmp, DS_DIR), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True
        )
        if full:
            _save_model(engine.module, backbone.tokenizer, Path(tmp, MODEL_DIR))
        else:
            _save_adapter(engine.module, Path(tmp, ADAPTER_DIR), ds_settings.zero_stage)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state.__dict__))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        # Ray Train has uploaded it to storage; local mode keeps only the directory itself,
        # so there the latest one lives on (train_lora copies the adapter out, then drops it)
        stale = local_checkpoints[:] if config["local_mode"] else [tmp]
        local_checkpoints[:] = [tmp] if config["local_mode"] else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    def validation_loss(data: DataIterator) -> float:
        """Rank 0 scores the whole validation set; every rank gets its number."""
        total, count = 0.0, 0
        if rank == 0:
            engine.eval()
            with torch.no_grad():
                for batch in data.iter_batches(
                    batch_size=training.batch_size, batch_format="numpy"
                ):
                    inputs = collate(batch)
                    n = int((inputs["labels"] != IGNORE_INDEX).sum())
                    total += float(engine(**inputs).loss) * n
                    count += n
            engine.train()
        return _broadcast_from_rank0(total / max(count, 1))

    train_data = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("validation") if config["has_validation"] else None
    max_steps = training.max_steps or math.inf
    samples_seen, clock = 0, time.perf_counter()

    while state.epoch < training.epochs and state.step < max_steps and not state.stopped_early:
        batches = train_data.iter_batches(
            batch_size=training.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=4 * training.batch_size,
            local_shuffle_seed=training.seed + state.epoch,
        )
        for index, batch in enumerate(batches):
            if index < state.batches_done_in_epoch:
                continue  # already trained on before the restart
            if state.step >= max_steps:
                break
            started = time.time()
            inputs = collate(batch)
            loss = engine(**inputs).loss
            engine.backward(loss)
            engine.step()
            state.step += 1
            state.batches_done_in_epoch = index + 1
            samples_seen += len(batch["source"]) * world
            finished = time.time()
            state.history.append(
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": _mean_across_ranks(loss.item()),
                    "samples_per_s": samples_seen / (time.perf_counter() - clock),
                    "step_start": started,
                    "step_end": finished,
                }
            )
            every = training.checkpoint_every_steps
            if every is not None and state.step % every == 0:
                report_checkpoint({})
        if val_data is not None and state.history:
            val_loss = validation_loss(val_data)
            state.history[-1]["val_loss"] = val_loss
            if (
                state.best_val_loss is None
                or val_loss < state.best_val_loss - training.early_stopping_min_delta
            ):
                state.best_val_loss, state.epochs_without_improvement = val_loss, 0
            else:
                state.epochs_without_improvement += 1
            patience = training.early_stopping_patience
            state.stopped_early = (
                patience is not None and state.epochs_without_improvement >= patience
            )
        state.epoch += 1
        state.batches_done_in_epoch = 0

    report_checkpoint(
        {"done": True, "stopped_early": state.stopped_early, "best_val_loss": state.best_val_loss}
    )
    if config["local_mode"]:  # through DeepSpeed, so that it drops its cached groups too
        deepspeed.comm.destroy_process_group()
    return {"history": state.history, "resumed_from_step": resumed_from_step, **engine_facts}
