"""Ray job: the low-resource study — data fractions × initialisations × seeds, plus ablations.

    ray job submit --working-dir . -- python jobs/low_resource.py \
        --config jobs/configs/low_resource.yaml

Thin: parse the config, connect to the job's cluster (or start a local Ray), run
`ray_twist.study.run_study`, print the summary. Re-submitting skips finished runs.
Exit status: 0 done, 2 bad config.
"""

from __future__ import annotations

import argparse
import sys

import ray

from ray_twist.config import ConfigError, StudyConfig, load_yaml
from ray_twist.study import run_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML (see jobs/configs/low_resource.yaml)")
    parser.add_argument("--out", help="override the config's output directory")
    args = parser.parse_args(argv)
    try:
        config = load_yaml(args.config, StudyConfig)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
