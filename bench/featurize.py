"""Benchmark: task keys on the Ray Data actor-pool featurizer vs a plain batched torch loop.

    python bench/featurize.py            # 8 styles x 400 pairs = 6400 sentences
    python bench/featurize.py --quick    # 4 styles x 64 pairs (one batch)

Anchor: `features.task_key` per task with one in-process `Featurizer` (same MiniLM, batch
size and torch thread count as one Ray Data actor), timed in the same run. Each way runs
twice: on one batch (its fixed cost: model load, actor start) and on everything; the
steady rate is the difference's, the end-to-end rate the full run's. Also checks that all
ways give the same keys. Prints a table and writes JSON
(default bench/results/featurize.json).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import numpy as np
import ray
import torch
from common import init_ray_fairly, write_result

from ray_twist.data import STYLES, make_world
from ray_twist.data.task import Task
from ray_twist.features import Featurizer, TaskKey, task_key, task_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few sentences (smoke run)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="bench/results/featurize.json")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    init_ray_fairly(cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    styles = list(STYLES)[:4] if args.quick else list(STYLES)
    tasks = list(make_world(64 if args.quick else 400, seed=0, styles=styles).values())
    sentences = sum(2 * len(t) for t in tasks)

    # one Ray Data actor holds one CPU: give the anchor that actor's torch thread count
    actor_threads = ray.get(ray.remote(num_cpus=1)(lambda: torch.get_num_threads()).remote())
    torch.set_num_threads(actor_threads)
    small = [tasks[0].take(list(range(args.batch_size)))]  # one batch per side: fixed costs

    def plain(subset: list[Task]) -> tuple[float, dict[str, TaskKey]]:
        start = time.perf_counter()
        featurizer = Featurizer(batch_size=args.batch_size)
        keys = {t.name: task_key(t, featurizer) for t in subset}
        return time.perf_counter() - start, keys

    def pipeline(subset: list[Task], workers: int) -> tuple[float, dict[str, TaskKey]]:
        start = time.perf_counter()
        keys = task_keys(subset, batch_size=args.batch_size, concurrency=workers)
        return time.perf_counter() - start, keys

    runs: dict[str, Callable[[list[Task]], tuple[float, dict[str, TaskKey]]]] = {
        "plain": plain,
        "ray_1": functools.partial(pipeline, workers=1),
        "ray_2": functools.partial(pipeline, workers=2),
    }
    reference: dict[str, TaskKey] = {}
    figures, max_diff = {}, 0.0
    for label, run in runs.items():
        fixed_s, _ = run(small)
        total_s, keys = run(tasks)
        reference = reference or keys
        for name, key in keys.items():
            max_diff = max(max_diff, float(np.abs(key.style_key - reference[name].style_key).max()))
        figures[label] = {
            "small_s": fixed_s,
            "total_s": total_s,
            "end_to_end_sentences_per_s": sentences / total_s,
            # the small run's time is the fixed cost (model load, actor start) plus one batch
            "steady_sentences_per_s": (sentences - 2 * args.batch_size) / (total_s - fixed_s),
        }
    steady = {k: v["steady_sentences_per_s"] for k, v in figures.items()}
    end_to_end = {k: v["end_to_end_sentences_per_s"] for k, v in figures.items()}
    result = {
        "sentences": sentences,
        "tasks": len(tasks),
        "batch_size": args.batch_size,
        "cpus": cpus,
        "ray_worker_niceness": os.environ["RAY_worker_niceness"],  # noqa: SIM112
        "torch_threads_per_worker": actor_threads,
        "runs": figures,
        "steady_ratio_1_worker": steady["ray_1"] / steady["plain"],
        "steady_ratio_2_workers": steady["ray_2"] / steady["plain"],
        "end_to_end_ratio_1_worker": end_to_end["ray_1"] / end_to_end["plain"],
        "max_key_difference": max_diff,
    }
    print(
        f"\nTask keys of {len(tasks)} tasks, {sentences} sentences, MiniLM, batch "
        f"{args.batch_size}, {actor_threads} torch thread(s) per worker, {cpus} CPUs"
    )
    print(f"  {'sentences/s':<30}{'steady':>10}{'ratio':>8}{'end to end':>12}{'ratio':>8}")
    for label, name in [("plain", "plain batched loop (anchor)"), ("ray_1", "Ray Data, 1 actor"),
                        ("ray_2", "Ray Data, 2 actors")]:  # fmt: skip
        print(
            f"  {name:<30}{steady[label]:>10.1f}{steady[label] / steady['plain']:>7.2f}x"
            f"{end_to_end[label]:>12.1f}{end_to_end[label] / end_to_end['plain']:>7.2f}x"
        )
    print("  goal: Ray Data 1 actor >= 0.9x the anchor (steady: fixed costs subtracted)")
    print(f"  {'max |key difference|':<30}{max_diff:>10.1e}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
