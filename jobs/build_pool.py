"""Ray job: train every source style of a config as its own LoRA, key, cluster, commit a pool.

    ray job submit --working-dir . -- python jobs/build_pool.py \
        --config jobs/configs/build_pool_synthetic.yaml

Thin: parse the config, connect to the job's cluster (or start a local Ray), run
`ray_twist.build.build_pool`, print the summary table. Re-submitting the same config trains
nothing; a changed or added source trains only itself. Exit status: 0 built, 1 some
sources failed (the rest are committed), 2 bad config.
"""

from __future__ import annotations

import sys

import ray
from _front import parse_job_config

from ray_twist.build import build_and_print
from ray_twist.build.config import BuildPoolConfig


def main(argv: list[str] | None = None) -> int:
    parsed = parse_job_config(
        __doc__,
        BuildPoolConfig,
        "jobs/configs/build_pool_*.yaml",
        argv,
        lambda p: p.add_argument("--no-progress", action="store_true", help="no progress bars"),
    )
    if parsed is None:
        return 2
    config, args = parsed
    ray.init(ignore_reinit_error=True)  # RAY_ADDRESS under `ray job submit`; else local
    return build_and_print(config, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
