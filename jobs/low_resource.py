"""Ray job: the low-resource study — data fractions × initialisations × seeds, plus ablations.

    ray job submit --working-dir . -- python jobs/low_resource.py \
        --config jobs/configs/low_resource.yaml

Thin: parse the config, connect to the job's cluster (or start a local Ray), run
`ray_twist.recipes.study.run_study`, print the summary. Re-submitting skips finished runs.
Exit status: 0 done, 2 bad config.
"""

from __future__ import annotations

import sys

import ray
from _front import parse_job_config

from ray_twist.recipes.study import run_study
from ray_twist.recipes.study.config import StudyConfig


def main(argv: list[str] | None = None) -> int:
    parsed = parse_job_config(
        __doc__,
        StudyConfig,
        "jobs/configs/low_resource.yaml",
        argv,
        lambda p: p.add_argument("--out", help="override the config's output directory"),
    )
    if parsed is None:
        return 2
    config, args = parsed
    if args.out:
        config = config.model_copy(update={"out": args.out})
    ray.init(ignore_reinit_error=True, log_to_driver=False)  # RAY_ADDRESS under `ray job submit`
    result = run_study(config)
    print(result.summary)
    print(
        f"{len(result.rows)} runs in {result.seconds:.0f} s; figures: {', '.join(result.figures)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
