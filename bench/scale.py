"""Benchmark: costs as corpora grow, one part at a time (`--part`).

    python bench/scale.py --part restyle                 # 10 k, 100 k, 1 M rows + a 2 GB file
    python bench/scale.py --part restyle --sizes 10000 100000 --big-mb 200   # smaller

Part "restyle" (issue 14): bulk restyling with the tiny T5 (adapted mode, one worker) of
10 k, 100 k and 1 M rows, each from one JSONL file: rows/s and the peak RSS of the driver
and of every Ray process (sampled every 0.2 s); the anchor is the smallest size, so
"rows/s vs first" near 1.0 means time grows linearly with the input, and flat RSS means
memory does not grow with it (a size is scaled down to fit `--max-run-s` at the previous
size's rate; the table says what ran). Then a 50 MB JSONL file and one large one
(`--big-mb`, scaled to `--max-run-s` at the 50 MB file's rate) read through the restyle
input pipeline alone (ranges, line numbers, JSON parsing, normalized rows; not
decoded: restyling 2 GB of rows takes hours on 2 cores): the number of read tasks, MB/s
and peak RSS. Prints a table and writes JSON (default bench/results/scale-<part>.json).
Other parts add a function to `PARTS`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
from common import init_ray_fairly, write_result

WORDS = ["the", "a", "quiet", "river", "old", "city", "green", "light", "small", "dog", "runs"]


class PeakRss:
    """Peak RSS (MiB) of this process and, summed, of its descendants (Ray's processes)."""

    def __init__(self) -> None:
        self.driver = self.ray = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = 0
            for child in me.children(recursive=True):
                with suppress(psutil.Error):
                    rss += child.memory_info().rss
            self.driver = max(self.driver, me.memory_info().rss / 2**20)
            self.ray = max(self.ray, rss / 2**20)
            self._stop.wait(0.2)

    @contextmanager
    def watching(self) -> Iterator[PeakRss]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def write_jsonl(path: Path, rows: int) -> int:
    """`rows` JSONL records {id, text} of 6-15 words; returns the file's size in bytes."""
    with path.open("w") as f:
        for lo in range(0, rows, 10_000):
            f.write(
                "".join(
                    json.dumps(
                        {"id": f"r{i}", "text": " ".join(
                            WORDS[(i * 7 + j * 5) % len(WORDS)] for j in range(6 + i % 10))}
                    ) + "\n"
                    for i in range(lo, min(rows, lo + 10_000))
                )
            )  # fmt: skip
    return path.stat().st_size


def restyle_part(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import ray

    from ray_twist.backbone import build_tiny_backbone, save_random_lora
    from ray_twist.data.ranges import line_ranges
    from ray_twist.restyle import restyle_corpus
    from ray_twist.restyle.inputs import read_rows
    from ray_twist.storage import resolve

    base = build_tiny_backbone("t5", root / "base")
    adapter = save_random_lora(base, root / "adapter", seed=1, rank=8)
    init_ray_fairly(2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows_out: list[dict[str, Any]] = []
    for asked in args.sizes:
        n = asked
        if rows_out:  # scaled down to fit --max-run-s at the last size's rate
            n = min(asked, int(rows_out[-1]["rows_per_s"] * args.max_run_s) // 1000 * 1000)
        source = root / f"in{n}.jsonl"
        size = write_jsonl(source, n)
        out = root / f"out{n}"
        with PeakRss().watching() as peak:
            summary = restyle_corpus(
                str(source), str(out), base, adapter, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, rows_per_part=args.rows_per_part,
            )  # fmt: skip
        assert summary["rows_written"] == n, summary
        rows_out.append({
            "rows": n, "rows_asked": asked, "input_mb": size / 2**20,
            "seconds": summary["seconds"], "rows_per_s": n / summary["seconds"],
            "peak_rss_driver_mb": peak.driver, "peak_rss_ray_mb": peak.ray,
            "load_after": os.getloadavg()[0],
        })  # fmt: skip
        print(f"  {n} rows: {rows_out[-1]}", flush=True)
        shutil.rmtree(out)
        source.unlink()
    reads = []
    for mb in (50, args.big_mb):  # a 50 MB probe, then the large file at the probe's rate
        if reads:
            mb = min(mb, reads[-1]["mb_per_s"] * args.max_run_s)
        if mb <= 0:
            continue
        source = root / "big.jsonl"
        size = write_jsonl(source, int(mb * 2**20 / 75))
        fs, path = resolve(str(source))
        start = time.perf_counter()
        with PeakRss().watching() as peak:
            ranges = len(line_ranges(fs, [path], None))
            ds = read_rows(str(source), "jsonl")
            count = sum(
                len(b["id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")
            )
        seconds = time.perf_counter() - start
        tasks = [int(t) for t in re.findall(r"ReadRanges\(lines\)\S*: (\d+) tasks", ds.stats())]
        reads.append({"input_mb": size / 2**20, "mb_asked": args.big_mb, "rows": count,
                      "ranges": ranges, "read_tasks": tasks[0] if tasks else None,
                      "seconds": seconds, "mb_per_s": size / 2**20 / seconds,
                      "peak_rss_driver_mb": peak.driver, "peak_rss_ray_mb": peak.ray,
                      "load_after": os.getloadavg()[0]})  # fmt: skip
        print(f"  file read: {reads[-1]}", flush=True)
        source.unlink()
    ray.shutdown()
    anchor = rows_out[0] if rows_out else None
    print(f"\nRestyle scale: tiny T5, adapted, 1 worker, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"  {'rows':>9}{'MB in':>8}{'seconds':>9}{'rows/s':>9}{'vs first':>9}"
          f"{'RSS driver':>12}{'RSS Ray':>10}{'load':>6}")  # fmt: skip
    for r in rows_out:
        ratio = r["rows_per_s"] / anchor["rows_per_s"] if anchor else 1.0
        r["rows_per_s_vs_first"] = ratio
        print(f"  {r['rows']:>9}{r['input_mb']:>8.1f}{r['seconds']:>9.1f}{r['rows_per_s']:>9.0f}"
              f"{ratio:>8.2f}x{r['peak_rss_driver_mb']:>10.0f}MB{r['peak_rss_ray_mb']:>8.0f}MB"
              f"{r['load_after']:>6.1f}")  # fmt: skip
    print("\n  input pipeline alone (read, count, parse; no decoding), one JSONL file:")
    print(f"  {'MB':>7}{'rows':>11}{'ranges':>8}{'read tasks':>12}{'seconds':>9}{'MB/s':>7}"
          f"{'RSS driver':>12}{'RSS Ray':>10}")  # fmt: skip
    for r in reads:
        print(f"  {r['input_mb']:>7.0f}{r['rows']:>11}{r['ranges']:>8}{r['read_tasks']!s:>12}"
              f"{r['seconds']:>9.1f}{r['mb_per_s']:>7.1f}{r['peak_rss_driver_mb']:>10.0f}MB"
              f"{r['peak_rss_ray_mb']:>8.0f}MB")  # fmt: skip
    return {"sizes": rows_out, "file_reads": reads, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "rows_per_part": args.rows_per_part}  # fmt: skip


PARTS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {"restyle": restyle_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--big-mb", type=float, default=2048, help="0: no large-file row")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows-per-part", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument(
        "--max-run-s",
        type=float,
        default=240,
        help="sizes and the large file scaled down to fit this, at measured rates",
    )
    parser.add_argument("--out", default=None, help="[bench/results/scale-<part>.json]")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix=f"bench-scale-{args.part}-"))
    try:
        result = PARTS[args.part](args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.update(part=args.part, cpus=os.cpu_count(), load_average=os.getloadavg())
    write_result(args.out or f"bench/results/scale-{args.part}.json", result)


if __name__ == "__main__":
    main()
