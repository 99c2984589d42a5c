"""Benchmark: Ray Data bulk restyling vs a plain `generate` loop, and 1 vs 2 workers.

    python bench/restyle.py            # small T5 (d=256, 4+4 layers), 512 rows
    python bench/restyle.py --quick    # the test-size tiny T5, 96 rows, about a minute

Anchor: `ray_twist.generation.generate` over the same rows, in the same batches, with the
same model (adapter merged), decoding settings and torch threads as one worker, run in a
plain Ray task (Ray runs its workers at nice 15; on a shared machine a driver-side loop
would get more CPU than any worker). "per worker" is rows / time the actors spent inside
their calls (restyle + validation + part writes); "end to end" is rows / wall clock of
`restyle_corpus` (actor start-up and model load included). Trials are interleaved and the
best of each kind is kept: on a shared machine other processes swing single timings ±50%.
Prints a table and writes JSON (default bench/results/restyle.json).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from common import write_result
from peft import PeftModel

from ray_twist.backbone import (
    build_small_t5,
    build_tiny_backbone,
    load_backbone,
    save_random_lora,
)
from ray_twist.generation import generate
from ray_twist.restyle import restyle_corpus

WORDS = ["the", "a", "quiet", "river", "old", "city", "green", "light", "small", "dog", "runs"]


def build_model(root: Path, quick: bool) -> tuple[str, str]:
    """(base model dir, random LoRA adapter dir)."""
    base = build_tiny_backbone("t5", root / "base") if quick else build_small_t5(root / "base")
    return base, save_random_lora(base, root / "adapter", seed=1, rank=8)


def corpus(n: int) -> list[str]:
    return [
        " ".join(WORDS[(i * 7 + j * 5) % len(WORDS)] for j in range(6 + i % 10)) for i in range(n)
    ]


def plain_loop(base: str, adapter: str, texts: list[str], args: argparse.Namespace) -> dict:
    """The anchor: one thread (as a 1-CPU worker), the same batches, no Ray Data."""
    torch.set_num_threads(1)
    backbone = load_backbone(base)
    backbone.model = PeftModel.from_pretrained(backbone.model, adapter).merge_and_unload().eval()
    start = time.perf_counter()
    for lo in range(0, len(texts), args.rows_per_part):
        generate(backbone, texts[lo : lo + args.rows_per_part], max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size)  # fmt: skip
    seconds = time.perf_counter() - start
    return {"rows": len(texts), "seconds": seconds, "rows_per_s": len(texts) / seconds}


def ray_run(
    base: str, adapter: str, input_uri: str, out: Path, workers: int, args: argparse.Namespace
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    summary = restyle_corpus(
        input_uri, str(out), base, adapter, batch_size=args.batch_size,
        concurrency=(workers, workers), max_new_tokens=args.max_new_tokens,
        rows_per_part=args.rows_per_part, num_cpus=1,
    )  # fmt: skip
    rows = summary["rows_written"]
    return {
        "workers": workers,
        "rows": rows,
        "seconds": summary["seconds"],
        "worker_seconds": summary["worker_seconds"],
        "rows_per_s_end_to_end": rows / summary["seconds"],
        "rows_per_s_per_worker": rows / summary["worker_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few rows (smoke run)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows-per-part", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="trials; best one is kept")
    parser.add_argument("--out", default="bench/results/restyle.json")
    args = parser.parse_args()
    n_rows = args.rows or (96 if args.quick else 512)
    args.repeats = args.repeats or (1 if args.quick else 3)

    root = Path(tempfile.mkdtemp(prefix="bench-restyle-"))
    base, adapter = build_model(root, args.quick)
    texts = corpus(n_rows)
    ids = [f"r{i:05d}" for i in range(n_rows)]
    pq.write_table(pa.table({"id": ids, "text": texts}), root / "corpus.parquet")

    # one logical CPU per worker, plus one for the read tasks
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # in a Ray task: Ray workers run at nice 15, so the anchor competes on the same terms
    anchor = ray.remote(num_cpus=1)(plain_loop)
    trials: dict[str, list[dict]] = {"plain": [], "1": [], "2": []}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
        trials["plain"].append(ray.get(anchor.remote(base, adapter, texts, args)))
        for w in (1, 2):
            out = root / f"out{w}"
            trials[str(w)].append(
                ray_run(base, adapter, str(root / "corpus.parquet"), out, w, args)
            )
    ray.shutdown()
    plain = max(trials["plain"], key=lambda t: t["rows_per_s"])
    one, two = (max(trials[w], key=lambda t: t["rows_per_s_per_worker"]) for w in ("1", "2"))
    best_end_to_end = {w: max(t["rows_per_s_end_to_end"] for t in trials[w]) for w in ("1", "2")}
    result = {
        "model": "tiny t5" if args.quick else "small t5 (d=256, 4+4 layers)",
        "rows": n_rows, "batch_size": args.batch_size, "rows_per_part": args.rows_per_part,
        "max_new_tokens": args.max_new_tokens, "cpus": os.cpu_count(),
        "repeats": args.repeats, "load_average": os.getloadavg(), "best_of": {
            "plain_generate": plain, "ray_1_worker": one, "ray_2_workers": two},
        "trials": trials,
        "per_worker_vs_plain": one["rows_per_s_per_worker"] / plain["rows_per_s"],
        "two_vs_one_workers_end_to_end": best_end_to_end["2"] / best_end_to_end["1"],
    }  # fmt: skip

    print(f"\nRestyle {n_rows} rows, {result['model']}, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, {os.cpu_count()} CPUs, best of {args.repeats}")  # fmt: skip
    print(f"  {'':<38}{'rows/s':>10}{'seconds':>10}")
    print(f"  {'plain generate loop (anchor)':<38}{plain['rows_per_s']:>10.1f}"
          f"{plain['seconds']:>10.1f}")  # fmt: skip
    for run in (one, two):
        label = f"Ray Data, {run['workers']} worker(s)"
        print(f"  {label + ', per worker':<38}{run['rows_per_s_per_worker']:>10.1f}"
              f"{run['worker_seconds']:>10.1f}")  # fmt: skip
        print(f"  {label + ', end to end':<38}{best_end_to_end[str(run['workers'])]:>10.1f}")
    print(f"\n  per worker / plain: {result['per_worker_vs_plain']:.2f}x   (goal >= 0.9x)")
    print(f"  2 vs 1 workers, end to end: {result['two_vs_one_workers_end_to_end']:.2f}x")
    print(f"  load average during the run: {result['load_average']}")
    write_result(args.out, result)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
