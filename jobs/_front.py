"""The `jobs/` scripts' shared front: `--config FILE` (+ a job's own flags), validated.

Each job script runs as `python jobs/<name>.py` (its folder is then on `sys.path`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from ray_twist.settings import ConfigError, load_yaml

M = TypeVar("M", bound=BaseModel)


def parse_job_config(
    doc: str,
    model_cls: type[M],
    example: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[M, argparse.Namespace] | None:
    """The `jobs/` scripts' shared front: `--config FILE` (+ the job's own flags), validated.

    Returns None after printing the error (file and dotted key) to stderr: the job exits 2.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True, help=f"YAML (see {example})")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return load_yaml(args.config, model_cls), args
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
