"""Ray job: TWIST initialisations for many targets in one batched merge (GPU when asked).

    ray job submit --working-dir . -- python jobs/merge_targets.py \
        --config jobs/configs/merge_targets.yaml

Thin: parse the config, run `ray_twist.initialise.run_merge_targets`: with `concurrency: n`
here, on the driver, which featurizes on Ray Data and merges chunks of targets as up to n
parallel Ray tasks; otherwise as one Ray task. Either holds `num_gpus` (CUDA merges). A
re-run skips the targets already written.
"""

from __future__ import annotations

import sys

import ray
from _front import parse_job_config

from ray_twist import storage
from ray_twist.initialise import MergeTargetsConfig, run_merge_targets


def main(argv: list[str] | None = None) -> int:
    parsed = parse_job_config(__doc__, MergeTargetsConfig, "jobs/configs/merge_targets.yaml", argv)
    if parsed is None:
        return 2
    cfg, _ = parsed
    # the task runs in another working directory: local paths leave here absolute
    paths = {k: storage.absolute(getattr(cfg, k)) for k in ("pool", "targets", "out")}
    cfg = cfg.model_copy(update=paths)
    ray.init(ignore_reinit_error=True)
    if cfg.concurrency:
        written = run_merge_targets(cfg)
    else:
        task = ray.remote(num_gpus=cfg.num_gpus, num_cpus=1)(run_merge_targets)
        written = ray.get(task.remote(cfg))
    print(f"wrote {len(written)} adapters under {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
