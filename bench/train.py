"""Benchmark: Ray Train + DeepSpeed LoRA loop vs plain PEFT loop; concurrent vs serial sources.

    python bench/train.py            # small random T5 (d_model 256, 4+4 layers), 3 sources
    python bench/train.py --quick    # tiny T5, fewer steps (smoke run)

Anchor: a single-process PEFT + torch AdamW loop (same model, data, batch, gradient
clipping and torch thread count as one Ray worker), timed in the same run before and after
the Ray run; ratios are against their mean, to cancel drift on a shared machine. Rates
exclude the first `--warmup` steps; besides the rate over all remaining steps, the rate
of the fastest 10-step window is given, which other load on the machine disturbs least.
Prints a table and writes JSON (default bench/results/train.json).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from common import init_ray_fairly, write_result

from ray_twist.backbone import build_small_t5, build_tiny_backbone, load_backbone
from ray_twist.data import make_world
from ray_twist.data.task import Task
from ray_twist.train import tokenize_pairs, train_lora, train_many, wrap_lora
from ray_twist.train.config import (
    DeepSpeedSettings,
    LoraSettings,
    ResourceSettings,
    TrainingSettings,
)

WINDOW = 10  # steps per window for the best-window rate


def rates(ends: list[float], batch: int, warmup: int) -> dict[str, float]:
    """Samples/s from step end times after `warmup`: over all those steps, and over the
    fastest `WINDOW` consecutive steps (robust to other load on a shared machine)."""
    steady = ends[warmup - 1 :]
    windows = [steady[i + WINDOW] - steady[i] for i in range(len(steady) - WINDOW)]
    return {
        "mean": batch * (len(steady) - 1) / (steady[-1] - steady[0]),
        "best_window": batch * WINDOW / min(windows),
    }


def plain_loop(base: str, task: Task, training: TrainingSettings, warmup: int) -> dict:
    """The anchor: PEFT LoRA + torch AdamW in this process, one batch after another."""
    backbone = load_backbone(base)
    model = wrap_lora(backbone.model, backbone.family, LoraSettings())
    model.train()
    torch.manual_seed(training.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=0.0)
    pairs, size, steps = task.pairs, training.batch_size, training.max_steps or 0
    ends: list[float] = []
    while len(ends) < steps:
        for lo in range(0, len(pairs) - size + 1, size):
            batch = pairs[lo : lo + size]
            inputs = tokenize_pairs(
                backbone.tokenizer,
                backbone.family,
                [s for s, _ in batch],
                [t for _, t in batch],
                training.max_source_length,
                training.max_target_length,
            )
            loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ends.append(time.time())
            if len(ends) == steps:
                break
    return rates(ends, size, warmup)


def ray_loop(
    base: str, task: Task, training: TrainingSettings, deepspeed: DeepSpeedSettings,
    warmup: int, root: str,
) -> dict:  # fmt: skip
    """Samples/s of one Ray Train worker (1 CPU, DeepSpeed engine), from its step history."""
    result = train_lora(task, base, LoraSettings(), training, deepspeed,
                        ResourceSettings(num_workers=1, cpus_per_worker=1), root,
                        f"throughput-{time.time_ns()}")  # fmt: skip
    return rates([row["step_end"] for row in result.history], training.batch_size, warmup)


def concurrency(
    base: str, tasks: list[Task], training: TrainingSettings, deepspeed: DeepSpeedSettings,
    root: str,
) -> dict:  # fmt: skip
    """Wall time of `train_many` over all tasks vs one `train_many` per task, in turn."""
    args = (base, LoraSettings(), training, deepspeed,
            ResourceSettings(num_workers=1, cpus_per_worker=0.5))  # fmt: skip
    start = time.perf_counter()
    train_many(tasks, *args, f"{root}/concurrent")
    together = time.perf_counter() - start
    start = time.perf_counter()
    for task in tasks:
        train_many([task], *args, f"{root}/sequential")
    one_by_one = time.perf_counter() - start
    return {"sources": len(tasks), "steps_each": training.max_steps, "cpus_per_source": 0.5,
            "concurrent_s": together, "sequential_s": one_by_one,
            "speedup": one_by_one / together}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of rates [5]")
    parser.add_argument("--zero-stage", type=int, default=2, choices=range(4),
                        help="DeepSpeed ZeRO stage of the Ray runs [2]")  # fmt: skip
    parser.add_argument("--out", default="bench/results/train.json")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    init_ray_fairly(cpus)
    steps = 20 if args.quick else 30
    batch = 16
    throughput = TrainingSettings(epochs=100, max_steps=steps, lr=1e-3, batch_size=batch,
                                  max_source_length=64, max_target_length=64,
                                  checkpoint_every_steps=None)  # fmt: skip
    deepspeed = DeepSpeedSettings(zero_stage=args.zero_stage)
    world = make_world(8 * batch, seed=0, styles=["pirate", "shouty", "formal"])

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        base = build_tiny_backbone("t5", model_dir) if args.quick else build_small_t5(model_dir)
        worker_threads = ray.get(ray.remote(num_cpus=1)(lambda: torch.get_num_threads()).remote())
        torch.set_num_threads(worker_threads)  # the anchor gets what one Ray worker gets
        task = world["pirate"]
        before = plain_loop(base, task, throughput, args.warmup)
        ray_rates = ray_loop(base, task, throughput, deepspeed, args.warmup, f"{tmp}/runs")
        after = plain_loop(base, task, throughput, args.warmup)
        many = concurrency(base, list(world.values()),
                           throughput.model_copy(update={"max_steps": steps // 2}), deepspeed,
                           f"{tmp}/runs")  # fmt: skip

    plain = {k: (before[k] + after[k]) / 2 for k in before}
    ratio = {k: ray_rates[k] / plain[k] for k in plain}
    result: dict[str, Any] = {
        "model": "tiny T5 (d_model 32)" if args.quick else "random T5 (d_model 256, 4+4 layers)",
        "cpus": cpus,
        "ray_worker_niceness": os.environ["RAY_worker_niceness"],  # noqa: SIM112
        "worker_torch_threads": worker_threads,
        "batch_size": batch,
        "steps": steps,
        "warmup_steps": args.warmup,
        "zero_stage": args.zero_stage,
        "window_steps": WINDOW,
        "plain_samples_per_s": {"before": before, "after": after, "mean_of_both": plain},
        "ray_samples_per_s_per_worker": ray_rates,
        "ray_vs_plain": ratio,
        "concurrency": many,
    }
    print(f"\nLoRA training throughput, {result['model']}, batch {batch}, "
          f"{worker_threads} torch thread(s), steps {args.warmup + 1}-{steps}")  # fmt: skip
    print(f"  {'samples/s':<34}{'best ' + str(WINDOW) + ' steps':>14}{'all steps':>11}")
    for name, row in [("plain PEFT loop (before)", before), ("plain PEFT loop (after)", after),
                      (f"Ray Train + DeepSpeed ZeRO-{args.zero_stage}", ray_rates)]:  # fmt: skip
        print(f"  {name:<34}{row['best_window']:>14.1f}{row['mean']:>11.1f}")
    print(f"  {'ratio vs mean of plain runs':<34}{ratio['best_window']:>13.2f}x"
          f"{ratio['mean']:>10.2f}x   (goal >= 0.85)")  # fmt: skip
    print(f"\n{many['sources']} sources x {many['steps_each']} steps, "
          f"{many['cpus_per_source']} CPU each, {cpus} CPUs")  # fmt: skip
    print(f"  {'concurrent (train_many)':<34}{many['concurrent_s']:>9.1f} s")
    print(f"  {'one after another':<34}{many['sequential_s']:>9.1f} s")
    print(f"  {'speed-up':<34}{many['speedup']:>9.2f} x")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
