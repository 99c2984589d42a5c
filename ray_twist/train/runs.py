"""Driver side: one training run per `TorchTrainer.fit()`, and many runs concurrently.

A run whose `name` already has checkpoints under `storage_path` resumes, so a re-submitted
job picks up where it died.

Many sources train concurrently (`train_many`): each run's `fit()` is driven by its own
zero-CPU Ray task, so the runs' placement groups share the cluster and Ray starts as many
as the resources allow; the rest wait for capacity (Ray Train retries worker-group
startup until it fits).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pyarrow.fs as pafs

from ray_twist import storage
from ray_twist.backbone import absolute_model_path
from ray_twist.data.task import Task
from ray_twist.train.config import (
    DeepSpeedSettings,
    FaultSettings,
    LoraSettings,
    ResourceSettings,
    TrainingSettings,
)
from ray_twist.train.failures import SetupError, fail_fast_callback, find_setup_error
from ray_twist.train.loop import ADAPTER_DIR, MODEL_DIR, train_loop_per_worker

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["TrainManyError", "TrainResult", "train_lora", "train_many", "train_model"]


@dataclass
class TrainResult:
    """What one training run leaves behind: a loadable adapter and its learning curve."""

    name: str
    output_dir: str  # the PEFT adapter dir, or (`train_model`) the whole model's dir
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_path: str = ""  # the final Ray Train checkpoint; "" in local mode (not kept)

    @property
    def adapter_dir(self) -> str:
        """The trained adapter (a LoRA run's `output_dir`)."""
        return self.output_dir

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
    allow_untrained_base: bool = True,
) -> TrainResult:
    """Train one LoRA on `task` with one `TorchTrainer.fit()`; return its adapter and curve.

    The run lives at `storage_path/name` (checkpoints and the final `adapter/` copy), so the
    adapter survives the driver. `init_adapter` starts from an existing PEFT adapter (its own
    rank and targets win over `lora`), which is how TWIST initialises a target LoRA.
    `allow_untrained_base=False` makes the workers refuse a base model whose load reports
    newly initialised weights (`backbone.UntrainedBaseError`).

    An error in a worker's setup (loading the base, wrapping the LoRA, a trial save) is
    raised as it is, at once; only failures after that restart from the last checkpoint.
    """
    _check_name(name)
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
    loop_config = {"base_model": base_model, "lora": lora, "init_adapter": init_adapter,
                   "allow_untrained_base": allow_untrained_base}  # fmt: skip
    return _fit(loop_config, datasets, training, deepspeed, resources, storage_path, name, fault)


def train_model(
    pairs: Dataset,
    base_model: str,
    training: TrainingSettings,
    deepspeed: DeepSpeedSettings,
    resources: ResourceSettings,
    storage_path: str,
    name: str,
    fault: FaultSettings | None = None,
) -> TrainResult:
    """Train **every** weight of `base_model` on a `source`/`target` dataset, no LoRA.

    The same loop, checkpoints and resume as `train_lora`; the result's `output_dir` is a
    plain HF model dir (weights + tokenizer). `twist base build` makes its base with this.
    """
    _check_name(name)
    if deepspeed.zero_stage == 3:
        raise ValueError("training every weight saves the model from rank 0: use zero_stage <= 2")
    loop_config = {"base_model": base_model, "lora": None, "init_adapter": None}
    return _fit(
        loop_config, {"train": pairs}, training, deepspeed, resources, storage_path, name, fault
    )


def _fit(
    loop_config: dict[str, Any],
    datasets: dict[str, Dataset | Callable[[], Dataset]],
    training: TrainingSettings,
    deepspeed: DeepSpeedSettings,
    resources: ResourceSettings,
    storage_path: str,
    name: str,
    fault: FaultSettings | None,
) -> TrainResult:
    """One `TorchTrainer.fit()` of the training loop; copy its output dir next to the run."""
    import ray.train

    if not hasattr(ray.train, "UserCallback"):  # Ray Train V1's API (RAY_TRAIN_V2_ENABLED=0)
        raise RuntimeError("ray_twist.train needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    if deepspeed.precision == "fp16" and resources.gpus_per_worker == 0:
        raise ValueError("deepspeed.precision: fp16 needs GPUs; use bf16 or fp32 on CPU workers")
    fault = fault or FaultSettings()
    output = ADAPTER_DIR if loop_config["lora"] is not None else MODEL_DIR
    # workers run in their own working directories: every local path leaves here absolute
    storage_path = storage.absolute(storage_path)
    loop_config = {
        **loop_config,
        "base_model": absolute_model_path(loop_config["base_model"]),
        "init_adapter": storage.absolute_or_none(loop_config.get("init_adapter")),
    }
    fs, root = storage.resolve(storage_path)
    use_gpu = resources.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    # typed as Ray Train V1's classes (V2 swaps them in at import time): the V2 trainer takes
    # a loop that returns a value and its `Result` carries it as `return_value`
    trainer = TorchTrainer(
        cast(Any, train_loop_per_worker),
        train_loop_config={
            **loop_config,
            "training": training,
            "deepspeed": deepspeed,
            "has_validation": "validation" in datasets,
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
            callbacks=[fail_fast_callback()],  # setup errors are not worker failures
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        result: Any = trainer.fit()
    except (SetupError, TrainingFailedError) as exc:  # SetupError itself: local mode
        setup = find_setup_error(getattr(exc, "controller_failure", exc))
        if setup is None:
            raise
        original = setup.unwrap()
        original.add_note(f"raised while setting up training run {name!r}; not retried")
        raise original from exc
    if result.checkpoint is None:
        raise RuntimeError(f"run {name!r} finished without a checkpoint")
    output_path = f"{root}/{name}/{output}"
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(output_path)
    fs.create_dir(output_path, recursive=True)
    pafs.copy_files(
        f"{result.checkpoint.path}/{output}",
        output_path,
        source_filesystem=result.checkpoint.filesystem,
        destination_filesystem=fs,
    )
    if resources.num_workers == 0:  # local mode: the checkpoint is a local temp dir
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    returned = result.return_value or {}
    return TrainResult(
        name=name,
        output_dir=storage.join(storage_path, name, output),
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
    allow_untrained_base: bool = True,
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
    # the Ray tasks run in other working directories: local paths leave here absolute
    init_adapters = {k: storage.absolute(v) for k, v in (init_adapters or {}).items()}
    base_model, storage_path = absolute_model_path(base_model), storage.absolute(storage_path)
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
        "allow_untrained_base": allow_untrained_base,
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
