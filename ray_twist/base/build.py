"""`twist base build`: a real-text seq2seq base model, trained offline on a copy objective.

LoRA on a frozen, newly initialised cross-attention cannot learn to transduce, so a BERT2BERT
warm start is no base for style LoRAs until every weight has learned to copy text. This
trains it: the warm start (vocabulary trimmed to the texts), then all weights on
(noisy text → text) pairs with the sources' own loop (Ray Train + DeepSpeed, checkpoints,
resume), then the copy-BLEU on held-out lines it never trained on.

    out/                      the base: config, safetensors, tokenizer (`base_model.path`)
    out/base_record.json      key, text digest, steps, loss curve, copy-BLEU, samples, timings
    out/.build/<key>/         warm start and checkpoints while building (removed when done)

The key hashes the texts' bytes and every setting that changes the weights, so the same
build reuses a finished base, and a killed build resumes from its last checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ray_twist import storage
from ray_twist.base.config import BaseBuildConfig, CopyNoiseSettings
from ray_twist.base.warm_start import used_token_ids, warm_start
from ray_twist.data.denoise import corrupt
from ray_twist.settings import json_digest
from ray_twist.train.config import ResourceSettings, TrainingSettings

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["RECORD_FILE", "BaseBuildResult", "build_base", "build_key"]

RECORD_FILE = "base_record.json"
_BUILD_DIR = ".build"
#: Settings that do not change the weights, so they are not part of the key.
_UNKEYED = {"out", "resources", "checkpoint_every_steps", "heldout_lines"}


@dataclass
class BaseBuildResult:
    """Where the base is, its record, and whether this call built it or found it built."""

    path: str
    record: dict[str, Any]
    reused: bool


def _digest_files(uris: list[str]) -> str:
    """sha256 over the files' bytes (streamed), in the order given."""
    digest = hashlib.sha256()
    for uri in uris:
        fs, path = storage.resolve(uri)
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def build_key(config: BaseBuildConfig, text_digest: str) -> str:
    """What the weights depend on: the texts' bytes and every keyed setting."""
    settings = config.model_dump(mode="json", exclude=_UNKEYED)
    return json_digest({"texts": text_digest, "settings": settings})[:16]


def _read_texts(uris: list[str], column: str) -> Dataset:
    """One `text` column from .txt (a line each), JSONL/JSON or Parquet files, read by Ray
    Data's own readers in parallel blocks; blank lines dropped."""
    import ray.data

    parts = []
    for uri in uris:
        fs, path = storage.resolve(uri)
        suffix = Path(path).suffix.lower()
        if suffix == ".txt":
            ds = ray.data.read_text(path, filesystem=fs)
        elif suffix == ".jsonl":  # Ray's JSON Lines reader picks its own filesystem
            ds = ray.data.read_json(uri if "://" in uri else path, lines=True)
        elif suffix == ".json":
            ds = ray.data.read_json(path, filesystem=fs)
        elif suffix == ".parquet":
            ds = ray.data.read_parquet(path, filesystem=fs, columns=[column])
        else:
            raise ValueError(f"{uri}: unknown text format {suffix!r}; use .txt, .jsonl or .parquet")
        if suffix != ".txt":
            if column not in ds.columns():
                raise ValueError(f"{uri}: no column {column!r}; columns: {ds.columns()}")
            ds = ds.select_columns([column]).rename_columns({column: "text"})
        parts.append(ds)
    texts = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return texts.map_batches(_clean_batch, batch_format="numpy")


def _clean_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    texts = [" ".join(str(t).split()) for t in batch["text"]]
    return {"text": np.array([t for t in texts if t], dtype=object)}


def _held_out(config: BaseBuildConfig, texts: Dataset) -> list[str]:
    """The copy-BLEU lines: from `heldout_texts`, or a hash-chosen slice of `texts`."""
    if config.heldout_texts is not None:
        pool = _read_texts(config.heldout_texts, config.text_column)
        return [r["text"] for r in pool.random_shuffle(seed=config.seed).take(config.heldout_lines)]
    period = max(2, texts.count() // config.heldout_lines)
    chosen = texts.filter(lambda row: zlib.crc32(row["text"].encode()) % period == 0)
    return sorted(r["text"] for r in chosen.take_all())[: config.heldout_lines]


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    from ray_twist.backbone import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def _used_ids_batch(batch: dict[str, np.ndarray], model: str) -> dict[str, np.ndarray]:
    ids = used_token_ids(_tokenizer(model), [str(t) for t in batch["text"]])
    return {"id": np.array(sorted(ids), dtype=np.int64)}


def _copy_pairs_batch(
    batch: dict[str, np.ndarray], noise: CopyNoiseSettings, seed: int
) -> dict[str, np.ndarray]:
    """(noisy text → text) pairs, each text's noise seeded by its own hash; rows sorted by
    length, so that batches cut from neighbouring rows carry little padding."""
    texts = sorted((str(t) for t in batch["text"]), key=len)
    sources = [
        corrupt(
            t,
            random.Random(zlib.crc32(t.encode()) ^ seed),
            dropout=noise.dropout,
            shuffle_window=noise.shuffle_window,
            mask_prob=noise.mask_prob,
        )
        for t in texts
    ]
    return {"source": np.array(sources, dtype=object), "target": np.array(texts, dtype=object)}


def _copy_bleu(model_dir: str, lines: list[str], max_length: int) -> tuple[float, list[str]]:
    """Lowercased corpus BLEU of the model's copy of each line against the line itself."""
    from ray_twist.backbone import load_backbone
    from ray_twist.generation import generate
    from ray_twist.metrics import bleu_scores

    backbone = load_backbone(model_dir)
    outputs = generate(
        backbone, lines, max_new_tokens=max_length, max_input_tokens=max_length, batch_size=64
    )
    return bleu_scores(outputs, [[line] for line in lines], lowercase=True)[0], outputs


def _training(config: BaseBuildConfig) -> TrainingSettings:
    return TrainingSettings(
        epochs=10_000,
        max_steps=config.steps,
        lr=config.lr,
        lr_schedule="linear",
        warmup_steps=min(config.warmup_steps, config.steps),
        batch_size=config.batch_size,
        max_source_length=config.max_length,
        max_target_length=config.max_length,
        seed=config.seed,
        checkpoint_every_steps=config.checkpoint_every_steps,
    )


def _resources(config: BaseBuildConfig, cpus: float) -> ResourceSettings:
    """The configured workers, or by the cluster's CPUs: local mode on one CPU, else one
    worker per 8 CPUs (at least one) sharing every CPU (the texts are materialised first)."""
    if config.resources is not None:
        return config.resources
    if cpus < 2:
        return ResourceSettings(num_workers=0, cpus_per_worker=1)
    workers = max(1, int(cpus // 8))
    return ResourceSettings(num_workers=workers, cpus_per_worker=int(cpus // workers))


def build_base(config: BaseBuildConfig) -> BaseBuildResult:
    """Build (or find built) the base that `config` describes; see the module docstring."""
    import ray

    started = time.perf_counter()
    out = Path(config.out).expanduser().absolute()
    if "://" in config.out:
        raise ValueError(f"out: {config.out!r} must be a local or shared directory (a model dir)")
    text_digest = _digest_files(config.texts)
    key = build_key(config, text_digest)
    record_path = out / RECORD_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            return BaseBuildResult(str(out), record, reused=True)
        raise FileExistsError(
            f"{out} holds a base built from other texts or settings (key {record.get('key')}, "
            f"this build's is {key}); choose another --out"
        )
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    work = out / _BUILD_DIR / key
    texts = _read_texts(config.texts, config.text_column)
    heldout = _held_out(config, texts)
    excluded = set(heldout)
    train = texts.filter(lambda row: row["text"] not in excluded)

    used = None
    if config.trim_vocab:
        ids = train.map_batches(
            functools.partial(_used_ids_batch, model=config.from_model), batch_format="numpy"
        )
        used = {int(i) for i in ids.unique("id")}
    init_dir = warm_start(config.from_model, work / "init", used, config.seed)
    pairs = train.random_shuffle(seed=config.seed).map_batches(
        functools.partial(_copy_pairs_batch, noise=config.noise, seed=config.seed),
        batch_size=64 * config.batch_size,
        batch_format="numpy",
    )
    # before training: the workers may hold every CPU, which would leave none to Ray Data
    pairs = pairs.materialize()
    prepared = time.perf_counter()

    from ray_twist.train import train_model

    resources = _resources(config, ray.cluster_resources().get("CPU", 1))
    result = train_model(
        pairs,
        init_dir,
        _training(config),
        config.deepspeed,
        resources,
        str(work / "runs"),
        "base",
    )
    trained = time.perf_counter()
    staging = out.with_name(f".{out.name}.{key}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    storage.download_dir(result.output_dir, staging)
    out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        item.replace(out / item.name)
    staging.rmdir()

    bleu, outputs = _copy_bleu(str(out), heldout, config.max_length)
    history = result.history
    steps_timed = max(len(history) - 1, 1)
    step_seconds = (
        (history[-1]["step_end"] - history[0]["step_end"]) / steps_timed if history else 0.0
    )
    record = {
        "key": key,
        "from_model": config.from_model,
        "texts": config.texts,
        "text_digest": text_digest,
        "settings": config.model_dump(mode="json"),
        "vocab_size": _tokenizer(str(out)).vocab_size,
        "vocab_size_before": _tokenizer(config.from_model).vocab_size,
        "steps": history[-1]["step"] if history else 0,
        "resumed_from_step": result.metrics.get("resumed_from_step"),
        "loss_curve": [[row["step"], round(row["loss"], 4)] for row in history],
        "seconds_per_step": step_seconds,
        "copy_bleu_lowercase": bleu,
        "heldout_lines": len(heldout),
        "heldout_source": "heldout_texts" if config.heldout_texts else "hash of texts",
        "samples": [
            {"input": i, "output": o} for i, o in zip(heldout[:5], outputs[:5], strict=True)
        ],
        "seconds": {
            "prepare": prepared - started,
            "train": trained - prepared,
            "total": time.perf_counter() - started,
        },
        "cpus": ray.cluster_resources().get("CPU"),
        "resources": resources.model_dump(mode="json"),
    }
    storage.write_bytes_atomic(str(record_path), json.dumps(record, indent=1).encode())
    shutil.rmtree(work, ignore_errors=True)
    return BaseBuildResult(str(out), record, reused=False)
