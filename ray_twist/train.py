"""LoRA training on Ray Train + DeepSpeed: source LoRAs for the pool, and target adaptation.

One training run is one `TorchTrainer.fit()`: every worker loads the frozen base model,
wraps it with a PEFT LoRA, and trains it under a DeepSpeed engine (ZeRO stage, precision
and optimizer offload from `DeepSpeedSettings`) on its shard of a Ray Data dataset. Ray
Train owns the process group (gloo on CPU, nccl on GPU); DeepSpeed reuses it.

Checkpoints (every `checkpoint_every_steps` and at the end) hold
    adapter/              PEFT adapter dir (rank 0; fp32 safetensors)
    trainer_state.json    step, epoch, position in the epoch, history, early-stopping state
    deepspeed/            the engine's own checkpoint: LoRA weights + (ZeRO-sharded) optimizer
and a restarted worker group resumes from the latest one. A run whose `name` already has
checkpoints under `storage_path` resumes too, so a re-submitted job picks up where it died.

Many sources train concurrently (`train_many`): each run's `fit()` is driven by its own
zero-CPU Ray task, so the runs' placement groups share the cluster and Ray starts as many
as the resources allow; the rest wait for capacity (Ray Train retries worker-group
startup until it fits).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow.fs as pafs
import torch

from ray_twist import storage
from ray_twist.config import (
    DeepSpeedSettings,
    FaultSettings,
    LoraSettings,
    ResourceSettings,
    TrainingSettings,
)
from ray_twist.data.task import Task
from ray_twist.generation import causal_prompt_ids

if TYPE_CHECKING:
    from peft import PeftModel
    from ray.data import DataIterator, Dataset
    from ray.train.v2.api.result import Result
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ray_twist.backbone import Family

__all__ = [
    "TrainResult",
    "TrainManyError",
    "deepspeed_config",
    "tokenize_pairs",
    "train_lora",
    "train_loop_per_worker",
    "train_many",
    "wrap_lora",
]

ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"
DS_TAG = "state"
FAULT_MARKER = ".fault_injected"
IGNORE_INDEX = -100


@dataclass
class TrainResult:
    """What one training run leaves behind: a loadable adapter and its learning curve."""

    name: str
    adapter_dir: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_path: str = ""  # the final Ray Train checkpoint; "" in local mode (not kept)

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.history]


class TrainManyError(RuntimeError):
    """Some runs of `train_many` failed; the others finished and are in `results`."""

    def __init__(self, errors: dict[str, BaseException], results: dict[str, TrainResult]):
        self.errors = errors
        self.results = results
        names = ", ".join(sorted(errors))
        super().__init__(f"{len(errors)} of {len(errors) + len(results)} runs failed: {names}")


# --------------------------------------------------------------------------------------
# Model, data and engine helpers (pure functions; also used by evaluation and serving)
# --------------------------------------------------------------------------------------


def wrap_lora(
    model: PreTrainedModel, family: Family, lora: LoraSettings, init_adapter: str | None = None
) -> PeftModel:
    """Trainable PEFT LoRA around a frozen base; an `init_adapter` dir brings its own config."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    from ray_twist.backbone import default_lora_targets, fan_in_fan_out

    if init_adapter is not None:
        with _local_dir(init_adapter) as path:
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


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    family: Family,
    sources: list[str],
    targets: list[str],
    max_source_length: int,
    max_target_length: int,
) -> dict[str, torch.Tensor]:
    """Model inputs with `labels`; padding and (causal) prompt positions are -100 in labels."""
    if family != "causal":
        enc = tokenizer(
            sources,
            max_length=max_source_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        labels = tokenizer(
            text_target=targets,
            max_length=max_target_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )["input_ids"]
        labels[labels == tokenizer.pad_token_id] = IGNORE_INDEX
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
        }
    rows = []
    for source, target in zip(sources, targets, strict=True):
        prompt = causal_prompt_ids(tokenizer, source, max_source_length)
        answer = tokenizer(target, add_special_tokens=False)["input_ids"][: max_target_length - 1]
        answer = [*answer, tokenizer.eos_token_id]
        rows.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


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
    return {
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


@contextlib.contextmanager
def _local_dir(uri: str) -> Iterator[str]:
    """A local path for a directory URI (downloaded to a temp dir when remote)."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(uri, tmp)
        yield tmp


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
        model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)


# --------------------------------------------------------------------------------------
# The per-worker training loop
# --------------------------------------------------------------------------------------


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


def _maybe_inject_failure(fault: FaultSettings, marker_uri: str, step: int) -> None:
    """Crash rank 0 once at `fault.fail_at_step`; the marker makes the retry succeed."""
    if fault.fail_at_step != step or torch.distributed.get_rank() != 0:
        return
    if storage.exists(marker_uri):
        return
    storage.write_bytes(marker_uri, str(step).encode())
    raise RuntimeError(f"injected failure at step {step}")


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


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker body: LoRA + DeepSpeed training with checkpoint/resume.

    `config` keys: base_model, lora, training, deepspeed, fault (settings models),
    init_adapter (dir or None), fault_marker (URI). Returns (rank 0's value is kept)
    the full step history and engine facts, so the driver needs no metrics store.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks an accelerator
    import deepspeed
    import ray.train

    from ray_twist.backbone import load_backbone

    training: TrainingSettings = config["training"]
    ds_settings: DeepSpeedSettings = config["deepspeed"]
    fault: FaultSettings = config["fault"]
    torch.manual_seed(training.seed)

    backbone = load_backbone(config["base_model"])
    model = wrap_lora(backbone.model, backbone.family, config["lora"], config["init_adapter"])
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
        _save_adapter(engine.module, Path(tmp, ADAPTER_DIR), ds_settings.zero_stage)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state.__dict__))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        # Ray Train has uploaded it to storage; local mode keeps only the directory itself,
        # so there the latest one lives on (train_lora copies the adapter out, then drops it)
        if local_checkpoints:
            for old in local_checkpoints:
                shutil.rmtree(old, ignore_errors=True)
            local_checkpoints.clear()
        if config["local_mode"]:
            local_checkpoints.append(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

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
            _maybe_inject_failure(fault, config["fault_marker"], state.step + 1)
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


# --------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name in {".", ".."} or ".." in name:
        raise ValueError(f"run name {name!r} must be a plain name (no path separators or '..')")


def _pairs_dataset(task: Task) -> Dataset:
    import ray.data

    return ray.data.from_items([{"source": s, "target": t} for s, t in task.pairs])


def train_lora(
    task: Task,
    base_model: str,
    lora: LoraSettings,
    training: TrainingSettings,
    deepspeed: DeepSpeedSettings,
    resources: ResourceSettings,
    storage_path: str,
    name: str,
    init_adapter: str | None = None,
    fault: FaultSettings | None = None,
) -> TrainResult:
    """Train one LoRA on `task` with one `TorchTrainer.fit()`; return its adapter and curve.

    The run lives at `storage_path/name` (checkpoints and the final `adapter/` copy), so the
    adapter survives the driver. `init_adapter` starts from an existing PEFT adapter (its own
    rank and targets win over `lora`), which is how TWIST initialises a target LoRA.
    """
    from ray.train import DataConfig
    from ray.train.v2._internal.constants import is_v2_enabled
    from ray.train.v2.api.config import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    if not is_v2_enabled():
        raise RuntimeError("ray_twist.train needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")

    _check_name(name)
    if deepspeed.precision == "fp16" and resources.gpus_per_worker == 0:
        raise ValueError("deepspeed.precision: fp16 needs GPUs; use bf16 or fp32 on CPU workers")
    fault = fault or FaultSettings()
    train_task, val_task = (
        task.split_off(training.val_fraction, seed=training.seed)
        if training.val_fraction > 0
        else (task, None)
    )
    if len(train_task) < resources.num_workers:
        raise ValueError(
            f"task {task.name!r} has {len(train_task)} training pairs for "
            f"{resources.num_workers} workers; every worker needs at least one"
        )
    datasets: dict[str, Dataset | Callable[[], Dataset]] = {"train": _pairs_dataset(train_task)}
    if val_task is not None and len(val_task):
        datasets["validation"] = _pairs_dataset(val_task)

    fs, root = storage.resolve(storage_path)
    use_gpu = resources.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "base_model": base_model,
            "lora": lora,
            "training": training,
            "deepspeed": deepspeed,
            "fault": fault,
            "init_adapter": init_adapter,
            "has_validation": "validation" in datasets,
            "fault_marker": storage.join(storage_path, name, FAULT_MARKER),
            "local_mode": resources.num_workers == 0,
        },
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=fault.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = cast("Result", trainer.fit())
    if result.checkpoint is None:
        raise RuntimeError(f"run {name!r} finished without a checkpoint")
    adapter_path = f"{root}/{name}/{ADAPTER_DIR}"
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(adapter_path)
    fs.create_dir(adapter_path, recursive=True)
    pafs.copy_files(
        f"{result.checkpoint.path}/{ADAPTER_DIR}",
        adapter_path,
        source_filesystem=result.checkpoint.filesystem,
        destination_filesystem=fs,
    )
    if resources.num_workers == 0:  # local mode: the checkpoint is a local temp dir
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    returned = result.return_value or {}
    return TrainResult(
        name=name,
        adapter_dir=storage.join(storage_path, name, ADAPTER_DIR),
        metrics=dict(result.metrics or {}),
        history=list(returned.get("history", [])),
        checkpoint_path="" if resources.num_workers == 0 else result.checkpoint.path,
    )


def _train_lora_kwargs(kwargs: dict[str, Any]) -> TrainResult:
    """`train_lora` with keyword arguments only: the body of `train_many`'s Ray tasks."""
    return train_lora(**kwargs)


def train_many(
    tasks: list[Task],
    base_model: str,
    lora: LoraSettings,
    training: TrainingSettings,
    deepspeed: DeepSpeedSettings,
    resources: ResourceSettings,
    storage_path: str,
    init_adapters: dict[str, str] | None = None,
    fault: FaultSettings | None = None,
) -> dict[str, TrainResult]:
    """Train one LoRA per task, concurrently: one Ray task drives each `fit()` (zero-CPU, or
    holding the run's resources in local mode, `num_workers: 0`).

    Runs start as soon as the cluster has room for their workers (`resources` each);
    the run for task `t` is named `t.name`. Raises `TrainManyError` (carrying the finished
    results) after every run has ended if any failed.
    """
    import ray

    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    for n in names:
        _check_name(n)
    init_adapters = init_adapters or {}
    # the task only drives `fit()`, except in local mode, where the loop runs inside it
    local = resources.num_workers == 0
    remote_train = ray.remote(
        num_cpus=resources.cpus_per_worker if local else 0,
        num_gpus=resources.gpus_per_worker if local else 0,
        max_retries=0,
    )(_train_lora_kwargs)
    common = {
        "base_model": base_model,
        "lora": lora,
        "training": training,
        "deepspeed": deepspeed,
        "resources": resources,
        "storage_path": storage_path,
        "fault": fault,
    }
    pending = {
        remote_train.options(name=f"train_lora[{t.name}]").remote(
            {**common, "task": t, "name": t.name, "init_adapter": init_adapters.get(t.name)}
        ): t.name
        for t in tasks
    }
    results: dict[str, TrainResult] = {}
    errors: dict[str, BaseException] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            task_name = pending.pop(ref)
            try:
                results[task_name] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - collected and re-raised below
                errors[task_name] = exc
    if errors:
        raise TrainManyError(errors, results) from next(iter(errors.values()))
    return {n: results[n] for n in names}
