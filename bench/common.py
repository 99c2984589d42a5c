"""What every benchmark does the same way: start Ray fairly against its anchor, write JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def init_ray_fairly(num_cpus: int) -> None:
    """A local Ray whose workers compete with the in-process anchor on equal terms.

    Ray starts workers at niceness 15: on a shared machine that alone would slow them
    against the nice-0 anchor. Ray is imported here: the GPU-only benchmarks run without it.
    """
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_worker_niceness", "0")  # noqa: SIM112 - Ray's own spelling
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def write_result(out: str | Path, result: dict[str, Any]) -> None:
    """The benchmark's JSON record at `out` (its folder created), and where it went."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
