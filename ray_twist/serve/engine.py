"""The model side of serving, without Ray: the style catalog, request checks, batched restyling.

A generator replica holds one `Engine`. `prepare` turns a request into `Work` (or an
`InputError` naming the field); `run` restyles a batch of works. Every row of a batch gets
its own LoRA through `ray_twist.lora.rows`, so rows with different adapters share one forward
pass: named adapters and per-sentence SVD merges ("adapted", "instance") as explicit
per-row factors, untruncated mixtures ("mixture") as per-row weights over the pool's
stacked factors. Rows are grouped only where they cannot share a `generate` call: by that
factor form and by decoding settings. Per-sentence retrieval and merges come from
`ray_twist.instance.InstanceStyler`, the code bulk restyling uses too.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ray_twist import storage
from ray_twist.backbone import load_backbone
from ray_twist.data.readers import read_task
from ray_twist.features import Featurizer, task_key
from ray_twist.generation import GenerationSettings, encode, generate_ids
from ray_twist.instance import InstanceStyler, weight_dicts
from ray_twist.lora import MODES, Mode, RowAdapters, per_row_factors, read_adapter, row_lora
from ray_twist.merge import ModuleFactors
from ray_twist.pool import Pool
from ray_twist.serve.api import ApiError, InputError, RestyleRequest, RestyleResponse, Timing, Usage
from ray_twist.serve.config import ServeConfig


@dataclass(frozen=True)
class StyleEntry:
    """A style a request may name: a registered adapter or a pool source."""

    name: str
    kind: Literal["adapter", "pool"]
    modes: tuple[Mode, ...]
    adapter: str | None = None  # URI of a registered adapter


class Catalog:
    """Every nameable style; pool sources serve all modes, registered adapters serve
    instance/mixture only when they come with examples (their style key is the query)."""

    def __init__(self, config: ServeConfig, pool: Pool | None) -> None:
        self.has_pool = pool is not None
        self.entries: dict[str, StyleEntry] = {}
        for name in pool.sources if pool is not None else []:
            self.entries[name] = StyleEntry(name, "pool", MODES)
        for name, style in config.styles.items():
            if name in self.entries:
                raise ValueError(f"style {name!r} is also a pool source; give it another name")
            modes = MODES if style.examples and pool is not None else ("adapted",)
            self.entries[name] = StyleEntry(name, "adapter", modes, style.adapter)

    def resolve(self, style: str | None, mode: Mode) -> StyleEntry | None:
        """The entry a request names (None: no style query), or an InputError."""
        if mode != "adapted" and not self.has_pool:
            raise InputError("mode", f"{mode} mode needs a weight pool; this server has none")
        if style is None:
            if mode == "adapted":
                raise InputError("style", "adapted mode needs a style; see GET /v1/styles")
            return None
        entry = self.entries.get(style)
        if entry is None:
            known = sorted(self.entries)
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise InputError("style", f"unknown style {style!r}; known: {shown}")
        if mode not in entry.modes:
            raise InputError(
                "style",
                f"style {style!r} has no examples to retrieve with; it serves adapted mode only",
            )
        return entry

    def describe(self) -> list[dict[str, object]]:
        return [
            {"name": e.name, "kind": e.kind, "modes": list(e.modes)} for e in self.entries.values()
        ]


@dataclass
class Work:
    """One validated, tokenized request; `adapter` is set for adapted mode."""

    request: RestyleRequest
    ids: list[list[int]]
    settings: GenerationSettings
    style: StyleEntry | None
    adapter: ModuleFactors | None = None


def _aligned(rows: list[ModuleFactors]) -> list[ModuleFactors]:
    """Every row gets every module: a zero rank-1 pair where its adapter leaves one out."""
    like = {m: pair for row in rows for m, pair in row.items()}
    if all(len(row) == len(like) for row in rows):
        return rows

    def zeros(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = like[module]
        return a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1)

    return [{m: row[m] if m in row else zeros(m) for m in like} for row in rows]


def _row_adapter(adapter: ModuleFactors | None, merged: ModuleFactors | None) -> ModuleFactors:
    """A row's explicit factors: its named adapter, else its per-sentence merge."""
    factors = adapter if adapter is not None else merged
    if factors is None:
        raise RuntimeError("a row has neither an adapter nor a merge")  # a bug, not input
    return factors


def read_adapter_uri(uri: str) -> ModuleFactors:
    """A PEFT adapter dir by URI (object-store adapters go through a temporary copy)."""
    with storage.local_dir(uri) as path:
        return read_adapter(path).modules


@dataclass
class _Group:
    rows: list[tuple[int, int]]  # (work, row in work)
    settings: GenerationSettings
    factors: RowAdapters


class Engine:
    """Base model, style catalog and (with a pool) an InstanceStyler; thread-safe `run`."""

    def __init__(self, config: ServeConfig, device: str | None = None) -> None:
        self.config = config
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pool = Pool.open(config.pool) if config.pool else None
        base = config.base_model or (self.pool.base_model if self.pool else "")
        self.backbone = load_backbone(
            base, getattr(torch, config.dtype), self.device, config.allow_untrained_base
        )
        # requests are tokenized on the event loop while a batch decodes in a worker thread;
        # a fast tokenizer must not be used from two threads at once, so each gets its own
        tokenizer = copy.deepcopy(self.backbone.tokenizer)
        self._front = dataclasses.replace(self.backbone, tokenizer=tokenizer)
        self.catalog = Catalog(config, self.pool)
        self.retriever: InstanceStyler | None = None
        if self.pool is not None:
            featurizer = Featurizer(config.featurizer or self.pool.featurizer, device=self.device)
            keys = {  # a registered style with examples: its style key is the task-level query
                name: task_key(read_task(style.examples, name=name), featurizer).style_key
                for name, style in config.styles.items()
                if style.examples
            }
            self.retriever = InstanceStyler(
                self.pool, config.retrieval, self.device, featurizer, style_keys=keys
            )
        self._lock = threading.Lock()  # one batch at a time owns the model's LoRA hooks

    def prepare(self, request: RestyleRequest) -> Work:
        """Check what the schema cannot (style, token counts) and tokenize."""
        style = self.catalog.resolve(request.style, request.mode)
        limits = self.config.limits
        ids = encode(self._front, request.texts)
        for i, row in enumerate(ids):
            if len(row) > limits.max_input_tokens:
                raise InputError(
                    f"texts[{i}]", f"{len(row)} tokens; the limit is {limits.max_input_tokens}"
                )
        settings = GenerationSettings(
            max_new_tokens=request.max_new_tokens or limits.default_max_new_tokens,
            num_beams=request.num_beams,
            do_sample=request.do_sample,
            temperature=request.temperature,
            top_p=request.top_p,
        )
        return Work(request, ids, settings, style)

    def load_adapter(self, name: str) -> ModuleFactors:
        """A named style's factors on the model's device, checked against the model."""
        entry = self.catalog.entries[name]
        try:
            if entry.kind == "pool" and self.pool is not None:
                modules = self.pool.load_factors(name)
            else:
                modules = read_adapter_uri(str(entry.adapter))
            modules = {m: (a.to(self.device), b.to(self.device)) for m, (a, b) in modules.items()}
            with self._lock, row_lora(self.backbone.model, per_row_factors([modules])):
                pass  # fails here, at load, if the adapter does not fit the base model
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ApiError(500, "adapter_unavailable", "style", f"{name!r}: {exc}") from exc
        return modules

    def run(self, works: list[Work]) -> list[RestyleResponse]:
        """Restyle a batch: one retrieval pass, one merge pass, one forward pass per group."""
        with self._lock:
            start = time.perf_counter()
            weights = self._retrieve(works)
            retrieved = time.perf_counter()
            groups = self._groups(works, weights)
            merged = time.perf_counter()
            outputs: dict[tuple[int, int], str] = {}
            for group in groups:
                ids = [works[w].ids[j] for w, j in group.rows]
                texts = generate_ids(self.backbone, ids, group.settings, len(ids), group.factors)
                outputs.update(zip(group.rows, texts, strict=True))
            done = time.perf_counter()
        styles = {w.style.name for w in works if w.request.mode == "adapted" and w.style}
        timing = Timing(
            retrieval_ms=1000 * (retrieved - start),
            merge_ms=1000 * (merged - retrieved),
            generate_ms=1000 * (done - merged),
            batch_requests=len(works),
            batch_rows=len(outputs),
            batch_styles=len(styles) + sum(len(x) for x in weights if x is not None),
        )
        return [
            self._response(i, work, weights[i], outputs, timing) for i, work in enumerate(works)
        ]

    def _retrieve(self, works: list[Work]) -> list[np.ndarray | None]:
        """Per work, (rows, N) source weights for its sentences (None in adapted mode)."""
        need = [i for i, w in enumerate(works) if w.request.mode != "adapted"]
        out: list[np.ndarray | None] = [None] * len(works)
        if not need or self.retriever is None:
            return out
        texts = [t for i in need for t in works[i].request.texts]
        styles = [works[i].request.style for i in need for _ in works[i].request.texts]
        all_weights = self.retriever.weights(texts, styles)
        offsets = np.cumsum([0] + [len(works[i].ids) for i in need])
        for k, i in enumerate(need):
            out[i] = all_weights[offsets[k] : offsets[k + 1]]
        return out

    def _groups(self, works: list[Work], weights: list[np.ndarray | None]) -> list[_Group]:
        """Rows grouped by (mixture or explicit factors, decoding settings), factors built."""
        keyed: dict[tuple[bool, GenerationSettings], list[tuple[int, int]]] = {}
        for i, work in enumerate(works):
            key = (work.request.mode == "mixture", work.settings)
            keyed.setdefault(key, []).extend((i, j) for j in range(len(work.ids)))
        row_weights = {
            (i, j): w[j] for i, w in enumerate(weights) if w is not None for j in range(len(w))
        }
        instance = [r for r in row_weights if works[r[0]].request.mode == "instance"]
        merged: dict[tuple[int, int], ModuleFactors] = {}
        if instance and self.retriever is not None:
            stacked = np.stack([row_weights[r] for r in instance])
            merged = dict(zip(instance, self.retriever.merged(stacked), strict=True))
        groups = []
        for (mixture, settings), rows in keyed.items():
            if mixture and self.retriever is not None:
                factors = self.retriever.mixture_rows(np.stack([row_weights[r] for r in rows]))
            else:
                adapters = [_row_adapter(works[i].adapter, merged.get((i, j))) for i, j in rows]
                factors = per_row_factors(_aligned(adapters))
            groups.append(_Group(rows, settings, factors))
        return groups

    def _response(
        self,
        index: int,
        work: Work,
        weights: np.ndarray | None,
        outputs: dict[tuple[int, int], str],
        timing: Timing,
    ) -> RestyleResponse:
        texts = [outputs[(index, j)] for j in range(len(work.ids))]
        names = self.pool.sources if self.pool is not None else []
        if weights is None:
            retrieval = [{work.request.style or "": 1.0} for _ in texts]
        else:
            retrieval = weight_dicts(names, weights)
        decoded = self.backbone.tokenizer(texts, add_special_tokens=False)["input_ids"]
        usage = Usage(
            input_tokens=sum(len(row) for row in work.ids),
            output_tokens=sum(len(row) for row in decoded),
        )
        return RestyleResponse(
            outputs=texts,
            retrieval=retrieval,
            mode=work.request.mode,
            style=work.request.style,
            usage=usage,
            timing=timing,
        )
