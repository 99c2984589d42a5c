"""Pool builds (`twist pool build`, `jobs/build_pool.py`): train every source's LoRA at once on
Ray, key the sources, cluster, commit one pool generation.

    config     `BuildPoolConfig` and the settings it is made of
    pipeline   `build_pool`: hashes, training, keying, the commit
    progress   the live progress display (reads the runs' checkpoints)
    report     the report types and the summary table
"""

from ray_twist.build.pipeline import (
    BuildPoolError,
    BuildReport,
    SourceOutcome,
    build_and_print,
    build_pool,
    resolve_base_model,
    source_tasks,
    summary_table,
    training_hash,
)

__all__ = [
    "BuildPoolError",
    "BuildReport",
    "SourceOutcome",
    "build_and_print",
    "build_pool",
    "resolve_base_model",
    "source_tasks",
    "summary_table",
    "training_hash",
]
