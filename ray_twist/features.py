"""Frozen BERT-family featurizer and task keys: what the pool is indexed and queried by.

Texts are embedded by a frozen encoder (mean-pooled over the attention mask, L2-normalised;
the sentence-transformers recipe for all-MiniLM-L6-v2). A task gets two keys:

- the **style key**: the normalised *shift* mean(targets) − mean(sources) of the unit
  embeddings — what the task does to a sentence. Means alone are dominated by content (every
  style of a corpus talks about the same things); the shift cancels content and keeps style,
  so sibling styles key close together and unrelated ones apart. For non-parallel corpora
  (denoising pairs) the shift is the corruption's undoing, so such sources key by their
  denoising direction rather than their style. Pool weight keys are clustered on style keys, cluster keys are their
  centroids, and task-level retrieval compares a target task's style key (q_t) against the
  cluster key k_c(s) of each source.
- the **input key**: normalised mean embedding of the task's *source* texts — what it is
  applied to. Instance-level retrieval compares one input sentence's embedding (in serving)
  or a target task's input key (q_x) against each source's input key k_s.

`Featurizer` is a callable class, so Ray Data runs it on an actor pool that loads the model
once per actor: ``ds.map_batches(Featurizer, fn_constructor_kwargs={...}, concurrency=2)``.
`task_keys` is that pipeline for a list of tasks. Nothing is downloaded: the default model
is the packaged all-MiniLM-L6-v2, other models are local paths or the offline HF cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from ray_twist.backbone import PACKAGED_MINILM, resolve_model_path
from ray_twist.data.task import Task
from ray_twist.vectors import unit_rows

DEFAULT_FEATURIZER = PACKAGED_MINILM


class Featurizer:
    """A frozen encoder: texts → unit-norm float32 embeddings (mean-pooled over real tokens).

    Also a Ray Data batch UDF: `__call__` reads `text_column` and adds an `embedding` column.
    """

    def __init__(
        self,
        model: str = DEFAULT_FEATURIZER,
        batch_size: int = 64,
        max_length: int = 128,
        device: str | None = None,
        text_column: str = "text",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.model_id = str(model)
        self.batch_size = batch_size
        self.max_length = max_length
        self.text_column = text_column
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model_path(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except OSError as exc:
            raise FileNotFoundError(
                f"featurizer {self.model_id!r} is neither a local model directory nor in the "
                "offline Hugging Face cache (nothing is downloaded here)"
            ) from exc
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, each row L2-normalised; batched so memory stays bounded."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = [str(t) for t in texts[start : start + self.batch_size]]
            enc = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out[start : start + len(chunk)] = pooled.cpu().numpy()
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data UDF: the batch with an `embedding` column (n, dim) added."""
        if self.text_column not in batch:
            raise KeyError(
                f"batch has no column {self.text_column!r} (columns: {sorted(batch)}); "
                "set text_column"
            )
        return {**batch, "embedding": self.encode(list(batch[self.text_column]))}


@dataclass
class TaskKey:
    """A task's keys: `style_key` over its targets, `input_key` over its sources (both (dim,))."""

    style_key: np.ndarray
    input_key: np.ndarray
    n_examples: int


def key_from_embeddings(emb: np.ndarray) -> np.ndarray:
    """Normalised mean of normalised rows: every example weighs the same, whatever its norm."""
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"emb must be a non-empty (n, dim) array, got shape {emb.shape}")
    return unit_rows(unit_rows(emb).mean(axis=0))


def style_shift_key(target_emb: np.ndarray, source_emb: np.ndarray) -> np.ndarray:
    """Normalised mean(targets) − mean(sources) over unit rows (zero if nothing changes)."""
    shift = unit_rows(np.asarray(target_emb, np.float32)).mean(axis=0) - unit_rows(
        np.asarray(source_emb, np.float32)
    ).mean(axis=0)
    return unit_rows(shift)


def task_key(task: Task, featurizer: Featurizer, max_examples: int | None = None) -> TaskKey:
    """Keys of one task with an in-process featurizer (small tasks, targets at serving time).

    A key is a mean, which a few hundred examples already pin down: with `max_examples`, a
    larger task is keyed on a seeded sample of that many (its `n_examples` stays the whole).
    """
    if len(task) == 0:
        raise ValueError(f"task {task.name!r} has no examples")
    n_examples = len(task)
    if max_examples is not None and n_examples > max_examples:
        task = task.sample(n=max_examples, seed=0)
    sources = featurizer.encode(task.sources)
    return TaskKey(
        style_key=style_shift_key(featurizer.encode(task.targets), sources),
        input_key=key_from_embeddings(sources),
        n_examples=n_examples,
    )


class _GroupSums(Featurizer):
    """Featurizer whose batches come out as per-group embedding sums (few rows, not n)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.encode(list(batch["text"]))
        groups = batch["group"]
        ids = np.unique(groups)
        sums = np.stack([emb[groups == g].sum(axis=0) for g in ids]).astype(np.float64)
        return {"group": ids, "sum": sums}


def task_keys(
    tasks: Sequence[Task],
    model: str = DEFAULT_FEATURIZER,
    *,
    batch_size: int = 64,
    concurrency: int = 1,
    num_gpus: float = 0,
) -> dict[str, TaskKey]:
    """Keys of many tasks on a Ray Data actor pool (model loaded once per actor).

    Embeddings are reduced to per-task partial sums inside the actors, so the driver only
    sees O(tasks × dim) numbers however large the corpora are. Since every embedding is
    unit-norm, the normalised sum equals `key_from_embeddings` of the same texts.
    """
    import ray.data

    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    empty = [t.name for t in tasks if len(t) == 0]
    if empty:
        raise ValueError(f"tasks without examples: {empty}")
    # group 2i: task i's targets (style key); 2i+1: its sources (input key)
    items = [
        {"group": 2 * i + side, "text": text}
        for i, t in enumerate(tasks)
        for side, texts in enumerate((t.targets, t.sources))
        for text in texts
    ]
    ds = ray.data.from_items(items).map_batches(
        _GroupSums,
        fn_constructor_kwargs={"model": model, "batch_size": batch_size},
        batch_size=batch_size,
        concurrency=concurrency,
        num_gpus=num_gpus,
    )
    sums: dict[int, np.ndarray] = {}
    for batch in ds.iter_batches(batch_size=None):
        for group, part in zip(batch["group"].tolist(), batch["sum"], strict=True):
            sums[group] = sums[group] + part if group in sums else part
    return {
        t.name: TaskKey(
            style_key=unit_rows(sums[2 * i] / len(t) - sums[2 * i + 1] / len(t)),
            input_key=unit_rows(sums[2 * i + 1]),
            n_examples=len(t),
        )
        for i, t in enumerate(tasks)
    }
