"""The model side of serving, without Ray: the style catalog, request checks, batched restyling.

A generator replica holds one `Engine`. `prepare` turns a request into `Work` (or an
`InputError` naming the field); `run` restyles a batch of works through the replica's
`ray_twist.styler.Styler`, the code bulk restyling runs too: every row of a batch gets its own
LoRA, so rows with different adapters and modes share one forward pass where their factor
form and decoding settings allow.

Pool commits while serving: a replica serves the pool generation it opened (retrieval keys
and factors, all in memory) and requests see no change during a commit. When a source it
must load lazily (a pool source named in adapted mode) has been garbage-collected because
newer generations exist, the engine reopens the newest generation, rebuilds its catalog and
styler on it (retrieval recomputed there, never keys of one generation with factors of
another), and the request is prepared again and served from it; batches already running
finish on the old one. Adapters cached per replica are keyed by generation
(`StyleEntry.model_id`), so none outlives a reload.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ray_twist import storage
from ray_twist.backbone import load_backbone
from ray_twist.data.readers import read_task
from ray_twist.features import Featurizer, task_key
from ray_twist.generation import GenerationSettings, TokenWatch, encode
from ray_twist.lora import MODES, Mode, read_adapter
from ray_twist.merge import ModuleFactors
from ray_twist.pool import Pool, PoolGenerationGoneError
from ray_twist.retrieval import InstanceRetrievalSettings, applied_retrieval
from ray_twist.serve.api import (
    ApiError,
    InputError,
    RestyleRequest,
    RestyleResponse,
    RetrievalApplied,
    Timing,
    Usage,
)
from ray_twist.serve.config import ServeConfig
from ray_twist.styler import Part, Styler, weight_dicts


@dataclass(frozen=True)
class StyleEntry:
    """A style a request may name: a registered adapter or a pool source."""

    name: str
    kind: Literal["adapter", "pool"]
    modes: tuple[Mode, ...]
    adapter: str | None = None  # URI of a registered adapter
    generation: int | None = None  # the pool generation of a pool source

    @property
    def model_id(self) -> str:
        """The adapter cache key: a pool source's is per generation (names have no '@')."""
        return self.name if self.generation is None else f"{self.name}@{self.generation}"


class Catalog:
    """Every nameable style; pool sources serve all modes, registered adapters serve
    instance/mixture only when they come with examples (their style key is the query)."""

    def __init__(self, config: ServeConfig, pool: Pool | None) -> None:
        self.has_pool = pool is not None
        self.entries: dict[str, StyleEntry] = {}
        if pool is not None:
            for name in pool.sources:
                self.entries[name] = StyleEntry(name, "pool", MODES, generation=pool.generation)
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
    """One validated, tokenized request; `adapter` is set for adapted mode, `watch` for a
    streamed request (it sees the rows' tokens as they decode and can stop them)."""

    request: RestyleRequest
    ids: list[list[int]]
    settings: GenerationSettings
    style: StyleEntry | None
    adapter: ModuleFactors | None = None
    watch: TokenWatch | None = None

    def gone(self) -> bool:
        """A streamed request whose caller left before its pass: nothing to run."""
        return self.watch is not None and all(self.watch.stopped(0, len(self.ids)))


def read_adapter_uri(uri: str) -> ModuleFactors:
    """A PEFT adapter dir by URI (object-store adapters go through a temporary copy)."""
    with storage.local_dir(uri) as path:
        return read_adapter(path).modules


class Engine:
    """Base model, style catalog and the replica's `Styler`; thread-safe `run`."""

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
        self._featurizer: Featurizer | None = None
        self._keys: dict[str, np.ndarray] | None = None
        if self.pool is not None:
            featurizer = Featurizer(config.featurizer or self.pool.featurizer, device=self.device)
            self._featurizer, self._keys = (
                featurizer,
                {  # a registered style with examples:
                    name: task_key(read_task(style.examples, name=name), featurizer).style_key
                    for name, style in config.styles.items()  # its key is the task-level query
                    if style.examples
                },
            )
        self.styler = self._styler(self.pool)
        self._lock = threading.Lock()  # one batch at a time owns the model's LoRA hooks
        self._reload_lock = threading.Lock()  # one reload at a time

    def _styler(self, pool: Pool | None) -> Styler:
        return Styler(
            self.backbone, pool, self.config.retrieval, self.device, self._featurizer,
            style_keys=self._keys, merge_orders=self.config.limits.merge_orders,
        )  # fmt: skip

    def reload_pool(self, gone: int) -> None:
        """Swap in the newest pool generation (catalog, styler) unless a reload already left
        generation `gone`; the swap waits for the running batch."""
        with self._reload_lock:
            if self.pool is None or self.pool.generation != gone:
                return
            pool = Pool.open(self.pool.uri)
            catalog, styler = Catalog(self.config, pool), self._styler(pool)
            with self._lock:
                self.pool, self.catalog, self.styler = pool, catalog, styler

    def prepare(self, request: RestyleRequest) -> Work:
        """Check what the schema cannot (style, token counts) and tokenize."""
        style = self.catalog.resolve(request.style, request.mode)
        limits = self.config.limits
        top_k = request.twist.top_k if request.twist is not None else None
        if top_k is not None and self.pool is not None and top_k > len(self.pool.sources):
            raise InputError(
                "twist.top_k", f"{top_k} > the pool's {len(self.pool.sources)} sources"
            )
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

    def load_adapter(self, model_id: str) -> ModuleFactors:
        """A named style's factors (by `StyleEntry.model_id`) on the model's device, checked
        against the model; one that fails to load is a 503 naming the style. A pool source
        of a generation this engine no longer serves, or one garbage collection has taken
        (the engine then reloads), raises `PoolGenerationGoneError`: prepare the request
        again, on the newest generation."""
        try:
            modules = self._read_adapter(model_id)
            modules = {m: (a.to(self.device), b.to(self.device)) for m, (a, b) in modules.items()}
            with self._lock:  # fails here, at load, if the adapter does not fit the base model
                self.styler.check_adapter(modules)
        except PoolGenerationGoneError:
            raise
        except Exception as exc:  # missing, corrupt, or not fitting the base model: the
            # server's adapter is at fault, not the request, and other styles still serve
            name = model_id.partition("@")[0]
            reason = f"{type(exc).__name__}: {exc}"
            message = f"style {name!r} is unavailable: its adapter failed to load ({reason})"
            raise ApiError(503, "adapter_unavailable", "style", message) from None
        return modules

    def _read_adapter(self, model_id: str) -> ModuleFactors:
        name, _, generation = model_id.partition("@")
        entry, pool = self.catalog.entries[name], self.pool
        if entry.kind != "pool" or pool is None:
            return read_adapter_uri(str(entry.adapter))
        if entry.model_id != model_id:  # prepared before a reload
            raise PoolGenerationGoneError(pool.uri, int(generation), pool.generation)
        try:
            return pool.load_factors(name)
        except PoolGenerationGoneError as exc:
            self.reload_pool(exc.generation)
            raise

    def run(self, works: list[Work]) -> list[RestyleResponse]:
        """Restyle a batch: one retrieval pass, one merge pass, one forward pass per group."""
        parts = [
            Part(w.request.texts, w.ids, w.request.mode, w.settings, w.request.style, w.adapter,
                 merge_order=w.request.merge_order, retrieval=self._retrieval(w.request),
                 watch=w.watch)
            for w in works
        ]  # fmt: skip
        with self._lock:  # one generation's styler for the whole batch, even across a reload
            names = self.styler.names
            styled, stages = self.styler.run(parts)
        styles = {w.style.name for w in works if w.request.mode == "adapted" and w.style}
        timing = Timing(
            retrieval_ms=1000 * stages.retrieval_s,
            merge_ms=1000 * stages.merge_s,
            generate_ms=1000 * stages.generate_s,
            batch_requests=len(works),
            batch_rows=sum(len(w.ids) for w in works),
            batch_styles=len(styles) + sum(len(s.weights) for s in styled if s.weights is not None),
        )
        return [
            self._response(work, result.outputs, result.weights, names, timing)
            for work, result in zip(works, styled, strict=True)
        ]

    def _response(
        self,
        work: Work,
        texts: list[str],
        weights: np.ndarray | None,
        names: list[str],
        timing: Timing,
    ) -> RestyleResponse:
        applied = None
        if weights is None:
            retrieval = [{work.request.style or "": 1.0} for _ in texts]
        else:
            retrieval = weight_dicts(names, weights)
            applied = self._applied(work)
        decoded = self.backbone.tokenizer(texts, add_special_tokens=False)["input_ids"]
        usage = Usage(
            input_tokens=sum(len(row) for row in work.ids),
            output_tokens=sum(len(row) for row in decoded),
        )
        return RestyleResponse(
            outputs=texts,
            retrieval=retrieval,
            retrieval_applied=applied,
            mode=work.request.mode,
            style=work.request.style,
            usage=usage,
            timing=timing,
        )

    def _retrieval(self, request: RestyleRequest) -> InstanceRetrievalSettings | None:
        """A request's own retrieval settings (the server's with its `twist` ones), or None."""
        if request.twist is None or not request.twist.overrides():
            return None
        return self.styler.settings.model_copy(update=request.twist.overrides())

    def _applied(self, work: Work) -> RetrievalApplied:
        """What a pool-mode request's weights and merges were computed with."""
        request = work.request
        settings = self._retrieval(request) or self.styler.settings
        instance = request.mode == "instance"
        return RetrievalApplied.model_validate(
            {
                **applied_retrieval(settings, request.style is not None),
                "rank": settings.rank if instance else None,
                "merge_order": (request.merge_order or settings.merge_order) if instance else None,
            }
        )
