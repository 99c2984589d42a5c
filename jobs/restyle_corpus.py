"""Ray job: restyle a corpus in bulk with Ray Data (one adapter, or per-row pool retrieval).

    ray job submit --working-dir . -- python jobs/restyle_corpus.py \
        --config jobs/configs/restyle_corpus.yaml

Thin: parse the config, run `ray_twist.restyle.run_restyle_corpus` from the job's driver (it
starts the Ray Data actor pool itself, one GPU per actor when the cluster has GPUs), print
the summary. Re-submitting the same config resumes: rows already written are skipped.
"""

from __future__ import annotations

import json
import sys

import ray
from _front import parse_job_config

from ray_twist.restyle import run_restyle_corpus
from ray_twist.restyle.config import RestyleCorpusConfig


def main(argv: list[str] | None = None) -> int:
    parsed = parse_job_config(
        __doc__, RestyleCorpusConfig, "jobs/configs/restyle_corpus.yaml", argv
    )
    if parsed is None:
        return 2
    cfg, _ = parsed
    ray.init(ignore_reinit_error=True)
    try:
        summary = run_restyle_corpus(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
