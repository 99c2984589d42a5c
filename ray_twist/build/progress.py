"""Live progress of a pool build's training runs, read from their latest checkpoints.

A thread polls each run's newest `trainer_state.json` while the runs train: a live table
on a terminal, one line per change elsewhere (job logs).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ray_twist import storage
from ray_twist.build.config import BuildPoolConfig
from ray_twist.data.task import Task
from ray_twist.train import STATE_FILE

__all__ = ["expected_steps", "latest_state", "show_progress"]


def latest_state(storage_path: str, run: str) -> dict[str, Any] | None:
    """trainer_state.json of a run's newest readable checkpoint (None before the first)."""
    fs, root = storage.resolve(storage.join(storage_path, run))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    checkpoints = sorted(i.base_name for i in infos if i.base_name.startswith("checkpoint_"))
    for name in reversed(checkpoints):
        try:  # a checkpoint may still be uploading, or already rotated away
            return json.loads(storage.read_bytes(storage.join(storage_path, run, name, STATE_FILE)))
        except (OSError, ValueError):
            continue
    return None


def expected_steps(task: Task, config: BuildPoolConfig) -> int:
    """Roughly how many steps a run takes (early stopping may end it sooner)."""
    training = config.training
    workers = max(1, config.resources.num_workers)  # 0: local mode, one process
    per_worker = len(task) * (1 - training.val_fraction) / workers
    total = training.epochs * max(1, math.ceil(int(per_worker) / training.batch_size))
    return min(total, training.max_steps or total)


def _watch(
    stop: threading.Event, runs: dict[str, str], totals: dict[str, int], storage_path: str
) -> None:
    """Until `stop`: a live table on a terminal, one line per change elsewhere (job logs)."""
    console = Console()
    state: dict[str, tuple[int, float | None]] = {}

    def poll() -> list[str]:
        changed: list[str] = []
        for name, run in runs.items():
            latest = latest_state(storage_path, run)
            if latest is None:
                continue
            history = latest.get("history") or [{}]
            row = (int(latest.get("step", 0)), history[-1].get("loss"))
            if state.get(name) != row:
                state[name] = row
                changed.append(name)
        return changed

    def line(name: str) -> tuple[str, str, str, str]:
        step, loss = state.get(name, (0, None))
        shown = "-" if loss is None else f"{loss:.4f}"
        return name, runs[name], f"{step}/{totals[name]}", shown

    def render() -> Table:
        table = Table(title="training sources (from their latest checkpoints)")
        for column in ("source", "run", "step", "loss"):
            table.add_column(column)
        for name in runs:
            table.add_row(*line(name))
        return table

    if console.is_terminal:
        with Live(render(), console=console, refresh_per_second=2) as live:
            while not stop.wait(2.0):
                poll()
                live.update(render())
            poll()
            live.update(render())
        return
    while True:
        stopping = stop.wait(5.0)
        for name in poll():
            source, run, step, loss = line(name)
            print(f"[progress] {source} ({run}): step {step}, loss {loss}", flush=True)
        if stopping:
            return


@contextlib.contextmanager
def show_progress(
    enabled: bool, runs: dict[str, str], totals: dict[str, int], storage_path: str
) -> Iterator[None]:
    """Show per-source progress in a thread while the body (the training) runs."""
    if not enabled or not runs:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(stop, runs, totals, storage_path), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
