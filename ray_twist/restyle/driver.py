"""The driver of bulk restyling: check the request, resume, run the actor pool, summarise."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pyarrow.fs as pafs

from ray_twist import storage
from ray_twist.generation import GenerationSettings
from ray_twist.lora import MODES, Mode
from ray_twist.restyle.actor import ERRORS_DIR, SUMMARY_FILE, RestyleJob, Restyler, RowStylerFactory
from ray_twist.restyle.config import RestyleCorpusConfig
from ray_twist.restyle.inputs import detect_input_format, read_rows
from ray_twist.retrieval import InstanceRetrievalSettings

_PART = re.compile(r"part-([0-9a-f]{16})-(\d{12})-(\d{12})-(\d+)\.parquet")


def finished_runs(output_uri: str) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """What a resumed run skips: per input file key, the (first, last) line intervals of
    the runs whose output part exists (merged, sorted), and how many rows they hold. Error
    parts of unfinished runs (a run killed between its two writes) are deleted: the run is
    redone. Reads file names only, never the parts."""
    fs, root = storage.resolve(output_uri)
    done: dict[str, list[tuple[int, int]]] = {}
    rows = 0
    names: dict[str, set[str]] = {}
    for folder in (root, f"{root}/{ERRORS_DIR}"):
        if fs.get_file_info(folder).type == pafs.FileType.Directory:
            listed = fs.get_file_info(pafs.FileSelector(folder))
            names[folder] = {f.base_name for f in listed if _PART.fullmatch(f.base_name)}
    for name in names.get(root, set()):
        key, first, last, count = _PART.fullmatch(name).groups()  # type: ignore[union-attr]
        done.setdefault(key, []).append((int(first), int(last)))
        rows += int(count)
    for name in names.get(f"{root}/{ERRORS_DIR}", set()) - names.get(root, set()):
        fs.delete_file(f"{root}/{ERRORS_DIR}/{name}")
    return {key: _merged(spans) for key, spans in done.items()}, rows


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint intervals covering the same lines (touching ones joined)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _start_record(output_uri: str, job: RestyleJob) -> None:
    """Refuse to resume an output written with other settings; else mark a run as started
    (before any part is written, so a killed run's settings are on record too)."""
    summary_uri = storage.join(output_uri, SUMMARY_FILE)
    current = json.loads(json.dumps(job.identity()))
    if storage.exists(summary_uri):
        previous = json.loads(storage.read_bytes(summary_uri)).get("job", current)
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:  # a key older runs did not record counts as its default (None)
            raise ValueError(
                f"{output_uri} was written with different settings ({', '.join(changed)}); "
                "resume with the same settings or write to a new output"
            )
    _write_json(summary_uri, {"status": "running", "job": current, **_applied(job)})


def _applied(job: RestyleJob) -> dict[str, Any]:
    """Pool jobs: {"retrieval_applied": λ applied (0 without a style), levels, ...}."""
    applied = job.applied()
    return {} if applied is None else {"retrieval_applied": applied}


def _write_json(uri: str, record: dict[str, Any]) -> None:
    storage.write_bytes_atomic(uri, json.dumps(record, indent=2, default=str).encode())


def _worker_gpus(concurrency: tuple[int, int], num_cpus: float, num_gpus: float | None) -> float:
    """GPUs per worker (one each when the cluster has GPUs, unless given). Refuses a pool
    whose minimum size takes every CPU: its read tasks would never be scheduled."""
    import ray

    if not 1 <= concurrency[0] <= concurrency[1]:
        raise ValueError(f"concurrency must be (min, max) with 1 <= min <= max; got {concurrency}")
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0.0)
    if concurrency[0] * num_cpus > cpus - 1:
        raise ValueError(
            f"{concurrency[0]} workers x {num_cpus} CPUs leave no CPU for reading the input "
            f"(the cluster has {cpus:g}); lower concurrency[0] or num_cpus"
        )
    if num_gpus is not None:
        return num_gpus
    return 1.0 if resources.get("GPU", 0) >= 1 else 0.0


def _style_source(
    mode: str | None,
    adapter: str | None,
    pool: str | None,
    row_styler: RowStylerFactory | None,
    retrieval: dict[str, Any],
) -> Mode:
    """The mode, checked against what styles the rows: an adapter (adapted), a pool or a
    row styler (instance, mixture); retrieval settings only with a pool."""
    if mode is None:
        mode = "adapted" if pool is None and row_styler is None else "instance"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if pool is not None and adapter is not None:
        raise ValueError(
            "give either adapter (adapted mode: one style for every row) or pool (instance/"
            "mixture modes: each row its own retrieved merge), not both"
        )
    if pool is not None and row_styler is not None:
        raise ValueError("give either pool or row_styler, not both")
    if mode == "adapted" and (pool is not None or row_styler is not None):
        raise ValueError("mode 'adapted' restyles with one adapter; with a pool use 'instance' "
                         "or 'mixture'")  # fmt: skip
    if mode != "adapted" and adapter is not None:
        raise ValueError(f"adapter is for adapted mode; mode {mode!r} takes a pool")
    if mode != "adapted" and pool is None and row_styler is None:
        raise ValueError(
            f"mode {mode!r} gives every row its own LoRA: pass pool (a weight pool URI) or a "
            "row_styler factory"
        )
    if retrieval and pool is None:
        raise ValueError(f"retrieval settings ({', '.join(retrieval)}) apply only with a pool")
    return mode  # type: ignore[return-value]


def _default_base_model(adapter: str | None) -> str:
    """The base model an adapter names (`base_model_name_or_path` in its config)."""
    name = None
    if adapter is not None:
        config = json.loads(storage.read_bytes(storage.join(adapter, "adapter_config.json")))
        name = config.get("base_model_name_or_path")
    if not name:
        raise ValueError("no base model given, and no adapter names one: pass base_model")
    return str(name)


def restyle_corpus(
    input_uri: str,
    output_uri: str,
    base_model: str | None = None,
    adapter: str | None = None,
    mode: str | None = None,
    style: str | None = None,
    batch_size: int = 16,
    concurrency: tuple[int, int] = (1, 1),
    max_new_tokens: int = 32,
    max_input_tokens: int = 128,
    *,
    pool: str | None = None,
    rank: int | None = None,
    lam: float | None = None,
    tau: float | None = None,
    top_k: int | None = None,
    merge_order: str | None = None,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    text_column: str = "text",
    id_column: str = "id",
    input_format: str | None = None,
    rows_per_part: int = 256,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    dtype: str = "float32",
    row_styler: RowStylerFactory | None = None,
    merge_budget_bytes: int = 256 << 20,
    read_range_bytes: int | None = None,
) -> dict[str, Any]:
    """Restyle every row of `input_uri` not yet in `output_uri`; returns the run's summary.

    Styles: `adapter` (mode "adapted", the default without a pool; `adapter=None` restyles
    with the bare base model), or `pool` (mode "instance", the default with a pool, or
    "mixture"): per-row retrieval with `lam`, `tau`, `top_k` and a rank-`rank` merge in
    `merge_order` (instance mode), the defaults of `InstanceRetrievalSettings` where not
    given; `style` then names a pool source whose style key is every row's task-level query
    (None: the instance level alone, λ applied as 0; the summary's `retrieval_applied` says
    which). `base_model` defaults to the adapter's or the pool's.

    An autoscaling pool of `concurrency` = (min, max) actors, each with `num_cpus` and
    `num_gpus` (default: one GPU when the cluster has GPUs), takes `rows_per_part` rows per
    call and generates `batch_size` at a time. Summary: rows_in, rows_skipped_existing,
    rows_processed (= rows_written + errors: the work this run did), seconds (wall clock) and
    worker_seconds (time actors spent inside calls: restyling, validating, writing parts).

    Scale: the input is read by many tasks (`read_range_bytes` per range of a file of lines;
    None: about 256 ranges of 1-64 MiB), never on the driver; a re-run skips the lines of
    finished parts by their names (`finished_runs`), so no actor holds a set of done ids;
    per-row modes build at most `merge_budget_bytes` of per-row factors at a time.
    """
    import ray.data

    from ray_twist.backbone import absolute_model_path

    # the actors run in other working directories: local paths leave here absolute
    input_uri, output_uri = storage.absolute(input_uri), storage.absolute(output_uri)
    adapter, pool = storage.absolute_or_none(adapter), storage.absolute_or_none(pool)
    given = {"rank": rank, "lambda": lam, "tau": tau, "top_k": top_k, "merge_order": merge_order}
    given = {k: v for k, v in given.items() if v is not None}
    chosen = _style_source(mode, adapter, pool, row_styler, given)
    if min(rows_per_part, batch_size, merge_budget_bytes, read_range_bytes or 1) < 1:
        raise ValueError(
            "rows_per_part, batch_size, merge_budget_bytes and read_range_bytes must be ≥ 1"
        )
    retrieval, generation = None, None
    if pool is not None:
        from ray_twist.pool import Pool

        retrieval = InstanceRetrievalSettings.model_validate(given)
        opened = Pool.open(pool)
        generation, base_model = opened.generation, base_model or opened.base_model
        if style is not None and style not in opened.sources:
            raise ValueError(f"style {style!r} is not a source of {pool}; known: {opened.sources}")
    base_model = absolute_model_path(base_model or _default_base_model(adapter))
    start = time.perf_counter()
    gpus = _worker_gpus(concurrency, num_cpus, num_gpus)
    settings = GenerationSettings(max_new_tokens, num_beams, do_sample, temperature, top_p)
    job = RestyleJob(
        input_uri, output_uri, base_model, adapter, chosen, style, settings, max_input_tokens,
        text_column, id_column, batch_size, dtype, num_cpus, row_styler, pool, generation,
        retrieval, merge_budget_bytes,
    )  # fmt: skip
    _start_record(output_uri, job)
    skip, skipped = finished_runs(output_uri)
    fmt = detect_input_format(input_uri, input_format)
    rows = read_rows(input_uri, fmt, text_column, id_column, skip, read_range_bytes)
    stats = rows.map_batches(
        Restyler,
        fn_constructor_kwargs={"job": job},
        batch_size=rows_per_part,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1]),
        num_cpus=num_cpus,
        num_gpus=gpus,
    )
    totals = {"rows": 0, "written": 0, "errors": 0, "seconds": 0.0}
    for batch in stats.iter_batches(batch_size=None, batch_format="numpy"):
        for key in totals:
            totals[key] += batch[key].sum().item()
    processed = totals["written"] + totals["errors"]
    summary = {
        "rows_in": skipped + totals["rows"],
        "rows_skipped_existing": skipped,
        "rows_processed": processed,
        "rows_written": totals["written"],
        "errors": totals["errors"],
        "seconds": round(time.perf_counter() - start, 3),
        "worker_seconds": round(totals["seconds"], 3),
        "output": output_uri,
        "errors_output": storage.join(output_uri, ERRORS_DIR),
        **_applied(job),
    }
    record = {"status": "complete", **summary, "job": job.identity(),
              "concurrency": list(concurrency), "batch_size": batch_size,
              "rows_per_part": rows_per_part}  # fmt: skip
    _write_json(storage.join(output_uri, SUMMARY_FILE), record)
    return summary


def run_restyle_corpus(cfg: RestyleCorpusConfig) -> dict[str, Any]:
    """The whole restyle job from its config (jobs/restyle_corpus.py)."""
    r = cfg.retrieval
    retrieval: dict[str, Any] = {}
    if r is not None:
        retrieval = {"rank": r.rank, "lam": r.lam, "tau": r.tau, "top_k": r.top_k,
                     "merge_order": r.merge_order}  # fmt: skip
    return restyle_corpus(
        cfg.input, cfg.output, cfg.base_model, cfg.adapter, cfg.mode, cfg.style,
        cfg.batch_size, (cfg.min_workers, cfg.max_workers), cfg.max_new_tokens,
        cfg.max_input_tokens, pool=cfg.pool, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
        temperature=cfg.temperature, top_p=cfg.top_p, text_column=cfg.text_column,
        id_column=cfg.id_column, input_format=cfg.input_format, rows_per_part=cfg.rows_per_part,
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, dtype=cfg.dtype,
        merge_budget_bytes=cfg.merge_budget_bytes, read_range_bytes=cfg.read_range_bytes,
        **retrieval,
    )  # fmt: skip
