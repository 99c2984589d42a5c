"""Bulk restyling of a corpus with Ray Data: resumable, bad rows set aside, one model per actor.

Input: Parquet, JSONL or text lines, a file or a directory, on any URI (see
`ray_twist.restyle.inputs` for columns, row ids and which rows are errors), read by many Ray
Data tasks: files of lines split into byte ranges, Parquet into row groups
(`ray_twist.data.ranges`); the driver never holds the corpus.

Output, under `output_uri`:
    part-<f>-<first>-<last>-<n>.parquet
                              id, input, output, style; in instance / mixture mode also
                              `weights`: map<string, double>, source name → retrieval weight
                              (each row's weights sum to 1; sources outside its top-k, weight
                              0, are left out). One file per run of consecutive input rows
                              (at most `rows_per_part`), written atomically and named by its
                              input file's key <f>, its first and last line (Parquet: row)
                              and its <n> rows; it may hold no rows (all were errors)
    _errors/<the same name>   id, input, reason, file, line — null, non-string,
                              empty/whitespace-only, undecodable UTF-8, malformed JSON, not an
                              object, over `max_input_tokens`; written before its output part
    _summary.json             settings and status ("running" from the start of a run,
                              "complete" with the run's counts and seconds at its end)
(names starting with "_" are skipped by Parquet dataset readers; `weights` reads back in
pyarrow as a list of (source, weight) pairs per row: `dict(row)`). A re-run skips the input
lines of every run whose output part exists (read from the part names, not the parts, and
handed to each read task for its own range: nothing the size of the corpus reaches an actor)
and restyles only the rest, so every input row is written exactly once; it refuses an
output written with different model, adapter, pool (or pool generation), style, retrieval
or decoding settings, or by an older part layout. Per-row modes merge at most
`merge_budget_bytes` of row factors at a time.

Modes:
    adapted   one PEFT adapter merged into the weights (`adapter=None`: the bare base model)
    instance  `pool=URI`: per row, instance retrieval over the pool (λ, τ, top-k) and the
              rank-q truncated SVD merge of the sources: the paper's per-sentence TWIST
    mixture   `pool=URI`: per row, the untruncated retrieval-weighted sum of the sources
In pool modes `style` (a pool source) is every row's task-level query; without one, rows are
retrieved at the instance level alone (λ applied as 0, `ray_twist.retrieval`), and
`_summary.json` records what applied (`retrieval_applied`: λ, levels, τ, top-k, rank, order).
Every mode runs `ray_twist.styler.Styler`, the code serving uses, loaded once per actor; a
part's rows are retrieved and merged together and decoded `batch_size` rows per forward pass
with per-row LoRA hooks (`ray_twist.lora.rows`). Other per-row stylers plug in through
`row_styler`: a factory, built once per actor from the loaded base model, mapping a batch of
texts to per-row factors and source weights.
"""

from ray_twist.restyle.actor import (
    ERRORS_DIR,
    SUMMARY_FILE,
    WEIGHTS_TYPE,
    RestyleJob,
    Restyler,
    RowStyler,
    RowStylerFactory,
)
from ray_twist.restyle.driver import finished_runs, restyle_corpus, run_restyle_corpus
from ray_twist.restyle.inputs import InputFormat, detect_input_format, read_rows, text_id

__all__ = [
    "ERRORS_DIR",
    "SUMMARY_FILE",
    "WEIGHTS_TYPE",
    "InputFormat",
    "RestyleJob",
    "Restyler",
    "RowStyler",
    "RowStylerFactory",
    "detect_input_format",
    "finished_runs",
    "read_rows",
    "restyle_corpus",
    "run_restyle_corpus",
    "text_id",
]
