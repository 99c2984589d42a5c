"""Prepare a verse-aligned multi-version corpus: text, pair and style-judge files, split by group.

    python jobs/prepare_aligned.py --config jobs/configs/bible_prepare.yaml \
        [--dir PATH] [--out DIR]

Thin and Ray-free: validate the config (`--dir` / `--out` override its `dir` / `out`), run
`ray_twist.data.aligned.prepare_aligned`, print the line count of every file written.
Relative paths are taken from the current directory (run from the repo root). A rerun with
the same settings and inputs rewrites nothing. Exit status: 0 done, 1 bad data, 2 bad config.
"""

from __future__ import annotations

import argparse
import sys
import time

from _front import parse_job_config
from pydantic import ValidationError

from ray_twist.data.aligned import AlignedCorpusSettings, PrepareAlignedConfig, prepare_aligned
from ray_twist.data.readers import DataError
from ray_twist.settings import format_validation_error


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="override the config's corpus directory")
    parser.add_argument("--out", help="override the config's output directory")


def main(argv: list[str] | None = None) -> int:
    parsed = parse_job_config(
        __doc__, PrepareAlignedConfig, "jobs/configs/bible_prepare.yaml", argv, _flags
    )
    if parsed is None:
        return 2
    config, args = parsed
    fields = config.model_dump(exclude={"out"})
    if args.dir:
        fields["dir"] = args.dir
    try:  # now the version files are checked, in the directory actually used
        settings = AlignedCorpusSettings.model_validate(fields)
    except ValidationError as exc:
        source = f"{args.config} (--dir {args.dir})" if args.dir else args.config
        print(f"error: {format_validation_error(exc, source)}", file=sys.stderr)
        return 2
    out = args.out or config.out
    start = time.perf_counter()
    try:
        manifest = prepare_aligned(settings, out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    width = max(len(name) for name in counts)
    print(f"{'file':<{width}}  {'lines':>7}")
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>7}")
    stats = manifest["versions"].items()
    print(
        "dropped (< {} words / duplicate id): {}".format(
            settings.min_words,
            ", ".join(f"{v} {s['dropped_short']}/{s['dropped_duplicate']}" for v, s in stats),
        )
    )
    print(
        f"{out}/manifest.json  digest {manifest['digest'][:12]}  {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
