"""The Ray Serve application: a FastAPI ingress in front of autoscaled generator replicas.

    HTTP ──► Ingress (FastAPI: parse, validate, time out) ──handle──► Generator replicas
                                                                    (Engine + adapter LRU,
                                                                     @serve.batch over texts)

Routing and batching. A request for a named adapter (adapted mode) carries the style name as
Serve's multiplexed model id (`handle.options(multiplexed_model_id=...)`). Each generator
replica keeps an LRU of adapters with `@serve.multiplexed`, keyed by that name, and Serve
reports each replica's ids to the routers, so a style's requests go to a replica that
already holds it (Serve's power-of-two router: a replica with the id; else, or when those
are busy, the one with the fewest adapters). Instance and mixture requests carry no id:
their per-sentence weights are computed on the replica, from the payload, and any replica
serves them.

Serve's `@serve.batch` splits each batch by multiplexed model id and runs the sub-batches
concurrently (`ray.serve.batching._BatchQueue._process_sub_batches`). Here the batch
function only hands its works to the replica's pass queue (`_Passes`) and returns futures,
so the sub-batches of one Serve batch, and every batch that forms while a forward pass
runs, meet again in the next pass: rows of different adapters and modes still share one
forward pass (the per-row LoRA path), routed or not.

Metrics (`ray_twist.serve.prometheus`): the generator records requests, latency, rows per
pass and stage times with `ray.serve.metrics`; `GET /metrics` gathers them with Ray Serve's
own from the nodes' metrics agents.
"""

# No `from __future__ import annotations` here: FastAPI resolves the route signatures of a
# Serve ingress class inside the replica, where postponed (string) annotations do not resolve.
import asyncio
import hashlib
import hmac
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.types import ASGIApp, Receive, Scope, Send

from ray_twist.merge import ModuleFactors
from ray_twist.pool import Pool, PoolGenerationGoneError
from ray_twist.serve import openai_api
from ray_twist.serve.api import (
    ApiError,
    ErrorBody,
    RestyleRequest,
    RestyleResponse,
    parse_restyle,
)
from ray_twist.serve.config import ServeConfig
from ray_twist.serve.engine import Catalog, Engine, StyleEntry, Work
from ray_twist.serve.prometheus import ReplicaMetrics, scrape
from ray_twist.serve.streaming import TextStream
from ray_twist.settings import ConfigError, format_validation_error, load_yaml
from ray_twist.storage import absolute, absolute_or_none

STOP_TIMEOUT_S = 4.0  # how long `twist serve` waits for its app to undeploy on a signal
_UNAVAILABLE = (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    DeploymentUnavailableError,
)


class _Slot:
    """A named style's place in the replica's adapter LRU, which Serve keys by the style name
    (the multiplexed model id requests are routed by). It holds the factors of the pool
    generation it last served (`model_id`: name@generation for a pool source) and reloads
    when the engine has moved to a newer one; a load that failed leaves it empty, to retry.
    Serve calls `__del__` when its LRU evicts a slot (Python may call it again at
    collection, hence the identity check)."""

    def __init__(self, name: str, live: dict[str, "_Slot"]) -> None:
        self.name, self._live = name, live
        self.model_id: str | None = None
        self.factors: ModuleFactors | None = None
        self._loading = asyncio.Lock()  # concurrent requests for a cold style load it once
        live[name] = self

    async def factors_for(
        self, style: StyleEntry, load: Callable[[str], Awaitable[ModuleFactors]]
    ) -> ModuleFactors:
        """The factors of `style` (this slot's style, as the engine now resolves it);
        `load(model_id)` reads them on a miss."""
        async with self._loading:
            if self.factors is None or self.model_id != style.model_id:
                self.factors = await load(style.model_id)
                self.model_id = style.model_id
            return self.factors

    def __del__(self) -> None:
        if self._live.get(self.name) is self:
            del self._live[self.name]


class _Passes:
    """Forward passes, one at a time, each taking every work queued so far (up to
    `max_rows` texts).

    Serve forms the next `@serve.batch` batch as soon as its wait time is up, even while
    the model is still busy with the previous one, so under load batches would stay as
    small as what arrives within one wait. Queued here instead, the batches that form
    while a pass runs share the next pass. Works whose request was cancelled (timed out)
    are dropped before their pass.
    """

    def __init__(self, engine: Engine, max_rows: int, metrics: ReplicaMetrics) -> None:
        self.engine, self.max_rows, self.metrics = engine, max_rows, metrics
        self.queue: list[tuple[Work, asyncio.Future[RestyleResponse]]] = []
        self.runner: asyncio.Task[None] | None = None
        self.running_rows = 0  # rows of the pass in progress

    def submit(self, works: list[Work]) -> list[asyncio.Future[RestyleResponse]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[RestyleResponse]] = [loop.create_future() for _ in works]
        self.queue.extend(zip(works, futures, strict=True))
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._drain())
        return futures

    async def _drain(self) -> None:
        while self.queue:
            take, rows = 1, len(self.queue[0][0].ids)
            while take < len(self.queue) and rows + len(self.queue[take][0].ids) <= self.max_rows:
                rows += len(self.queue[take][0].ids)
                take += 1
            live = [(w, f) for w, f in self.queue[:take] if not f.done() and not w.gone()]
            del self.queue[:take]
            if not live:
                continue
            self.running_rows = sum(len(w.ids) for w, _ in live)
            try:
                results = await asyncio.to_thread(self.engine.run, [w for w, _ in live])
            except Exception as exc:  # the whole pass failed: every request in it hears why
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.running_rows = 0
            self.metrics.forward_pass(results[0].timing)
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)


@serve.deployment(name="Generator")
class Generator:
    """Holds the base model, the pool's factors and an LRU of named adapters."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        torch.set_num_threads(max(1, int(config.generator.num_cpus)))
        self.engine = Engine(config)
        self.loads, self.slots = 0, 0
        self.cached: dict[str, _Slot] = {}
        self.served: Counter[str] = Counter()  # adapted-mode requests received, per style

        async def slot(name: str) -> _Slot:  # a plain function: Serve keeps its LRU on it
            self.slots += 1
            return _Slot(name, self.cached)

        size = config.generator.max_adapters_per_replica
        self._slot = serve.multiplexed(max_num_models_per_replica=size)(slot)
        # the decorator's setters (not in its type): batches are counted in texts
        self._batch.set_max_batch_size(config.batching.max_batch_rows)  # type: ignore[attr-defined]
        self._batch.set_batch_wait_timeout_s(config.batching.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.metrics = ReplicaMetrics()
        self._passes = _Passes(self.engine, config.batching.max_batch_rows, self.metrics)
        self.streams: deque[TextStream] = deque(maxlen=256)  # the latest, for `stats`

    async def restyle(self, request: RestyleRequest) -> RestyleResponse:
        """Check and tokenize one request, then wait for its place in a batch."""
        with self.metrics.request(request.mode, method="restyle"):
            return await (await self._batch(await self._work(request)))

    async def _work(self, request: RestyleRequest) -> Work:
        """One request checked and tokenized, with its named adapter (adapted mode)."""
        work = self.engine.prepare(request)
        if request.mode == "adapted" and work.style is not None:
            self.served[work.style.name] += 1
            try:
                work.adapter = await self._factors(work.style)
            except PoolGenerationGoneError:  # the engine now serves the newest generation
                work = self.engine.prepare(request)
                work.adapter = await self._factors(cast(StyleEntry, work.style))
        return work

    async def restyle_stream(
        self, request: RestyleRequest, deltas: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        """`restyle`, streamed (a Serve streaming method: call it with `stream=True`):
        {"start": input tokens} once the request is accepted (errors come before it), then
        (with `deltas`) {"deltas": [[row, text], ...]} as its rows decode in their shared
        batch, then {"end": response, "tails": ..., "finish_reasons": ...}. A caller that
        leaves (Serve cancels this generator) stops its rows at the next decoding step, or
        drops them from the queue before their pass."""
        with self.metrics.request(request.mode, method="restyle_stream"):
            async for event in self._stream(request, deltas):
                yield event

    async def _stream(self, request: RestyleRequest, deltas: bool) -> AsyncIterator[dict[str, Any]]:
        work = await self._work(request)
        backbone = self.engine.backbone
        eos = backbone.model.generation_config.eos_token_id
        stream = TextStream(
            backbone.tokenizer, len(work.ids), work.settings.max_new_tokens,
            eos if isinstance(eos, list) else [backbone.tokenizer.eos_token_id if eos is None else eos],
            asyncio.get_running_loop(), decode=deltas,
        )  # fmt: skip
        work.watch = stream
        self.streams.append(stream)
        yield {"start": sum(len(row) for row in work.ids)}
        try:
            result = await self._batch(work)
            result.add_done_callback(lambda _: stream.finish())
            async for batch in stream.deltas():
                yield {"deltas": [[d.row, d.text] for d in batch]}
            response = await result
        finally:
            if not stream.finished:
                stream.cancel()
        yield {
            "end": response,
            "tails": [stream.tail(i, text) for i, text in enumerate(response.outputs)],
            "finish_reasons": [stream.finish_reason(i) for i in range(len(response.outputs))],
        }

    async def _factors(self, style: StyleEntry) -> ModuleFactors:
        slot = await self._slot(style.name)
        return await slot.factors_for(style, self._load)

    async def _load(self, model_id: str) -> ModuleFactors:
        factors = await asyncio.to_thread(self.engine.load_adapter, model_id)
        self.loads += 1
        return factors

    @serve.batch(max_batch_size=32, batch_size_fn=lambda works: sum(len(w.ids) for w in works))
    async def _batch(self, works: list[Work]) -> list[asyncio.Future[RestyleResponse]]:
        """Serve's batch joins the queue of the next forward pass (see `_Passes`)."""
        return self._passes.submit(works)

    def stats(self) -> dict[str, Any]:
        """Replica id, the pool generation it serves, adapters now cached (pool sources as
        name@generation), how many were loaded and evicted, and the adapted-mode requests
        this replica received per style (where the router sent them)."""
        pool = self.engine.pool
        cancelled = [s for s in self.streams if s.cancelled]
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pool_generation": pool.generation if pool is not None else None,
            "adapters": sorted(s.model_id for s in self.cached.values() if s.model_id),
            "loads": self.loads,
            "evictions": self.slots - len(self.cached),
            "served": dict(self.served),
            "queued_rows": sum(
                len(w.ids) for w, f in self._passes.queue if not f.done() and not w.gone()
            ),
            "running_rows": self._passes.running_rows,
            "streams_cancelled": len(cancelled),
            "rows_stopped_early": sum(s.stopped_early for s in cancelled),
        }


api = FastAPI(
    title="ray-twist",
    summary="Restyle text with TWIST style adapters: named, or retrieved and merged per sentence",
    version="1",
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503, 504)
}
_OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": openai_api.ErrorResponse} for code in (400, 401, 404, 413, 415, 503, 504)
}


class _BearerAuth:
    """ASGI middleware: with API keys configured, every request but the public paths needs
    `Authorization: Bearer <key>` (else 401 in the error shape). Keys are kept as SHA-256
    digests and compared in constant time; neither they nor a presented key are logged.

    Public: /healthz (load balancers and probes carry no key) and the API docs (/docs,
    /redoc, /openapi.json: the request/response schema, which is the open-source code's and
    holds no styles, pool or data). Every other route, present or added later, is guarded.
    """

    PUBLIC = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
    OPENAI = ("/v1/completions", "/v1/chat/completions", "/v1/models")
    digests: tuple[bytes, ...] = ()  # per replica process: set by `Ingress.__init__`

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @classmethod
    def use(cls, keys: list[str]) -> None:
        cls.digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    @classmethod
    def allows(cls, authorization: str | None) -> bool:
        scheme, _, key = (authorization or "").partition(" ")
        presented = hashlib.sha256(key.strip().encode()).digest()
        matched = False
        for digest in cls.digests:  # no early exit: the time does not depend on which matched
            matched |= hmac.compare_digest(digest, presented)
        return matched and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.digests:
            path, root = scope["path"], scope.get("root_path", "")
            path = (path[len(root) :] or "/") if root and path.startswith(root) else path
            header: bytes | None = dict(scope["headers"]).get(b"authorization")
            presented = header.decode("latin-1") if header is not None else None
            if path not in self.PUBLIC and not self.allows(presented):
                openai = path.startswith(self.OPENAI)  # answered in OpenAI's error shape
                refused = (openai_api.OpenAIError if openai else ApiError)(
                    401, "invalid_api_key" if openai else "unauthorized", "authorization",
                    "missing or invalid API key: send the header Authorization: Bearer <key>",
                )  # fmt: skip
                response = JSONResponse(
                    refused.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


api.add_middleware(_BearerAuth)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug or a broken deployment: still JSON, and the replica keeps serving."""
    message = f"internal error ({type(exc).__name__}); see the replica logs"
    return JSONResponse(ApiError(500, "internal", None, message).body(), status_code=500)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (chunked or not)."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, "body_too_large", "body", f"body exceeds {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _request_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's documented JSON body (the routes read the raw body themselves)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _openai_post(path: str, model: type[BaseModel]) -> Any:
    """An OpenAI-compatible POST route: OpenAI-shaped errors and `model`'s documented body."""
    return api.post(path, responses=_OPENAI_ERRORS, openapi_extra=_request_body(model))


async def _json_body(request: Request, limit: int) -> bytes:
    """A JSON request's body (415 naming content-type otherwise; 413 past `limit` bytes)."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "content-type", f"{kind} is not JSON")
    return await _read_body(request, limit)


async def _answer(
    response: DeploymentResponse | DeploymentResponseGenerator,
    timeout_s: float,
    awaited: Awaitable[Any] | None = None,
) -> Any:
    """The generator's answer (or `awaited`, e.g. a stream's next item); Ray failures
    become 503/504 instead of a hang or a 500."""
    try:
        return await asyncio.wait_for(awaited or cast(DeploymentResponse, response), timeout_s)
    except TimeoutError:
        response.cancel()
        raise ApiError(504, "timeout", None, f"no answer within {timeout_s:g} s") from None
    except BackPressureError:
        raise ApiError(503, "overloaded", None, "all replicas are busy; retry later") from None
    except _UNAVAILABLE as exc:
        message = f"replica unavailable ({type(exc).__name__}); retry"
        raise ApiError(503, "unavailable", None, message) from None


# Module helpers the ingress routes call are defined above it: `serve.ingress` serialises the
# FastAPI app when the class is decorated, with the globals that exist at that moment.


async def _events(stream: DeploymentResponseGenerator, deadline: float) -> AsyncIterator[Any]:
    """A generator stream's items, each awaited as `_answer` awaits (503/504, not a hang)."""
    while True:
        try:
            yield await _answer(stream, deadline - time.monotonic(), stream.__anext__())
        except StopAsyncIteration:
            return


async def _sse(
    events: AsyncIterator[Any],
    stream: DeploymentResponseGenerator,
    reply: "openai_api.Reply",
    params: "openai_api.Params",
) -> AsyncIterator[bytes]:
    """An accepted stream as OpenAI's server-sent events, ending with `data: [DONE]`; a
    failure mid-stream is an error event. However it ends (a client that disconnects
    cancels this generator) the generator replica's stream is cancelled, which frees the
    request's batch slot."""
    sse = openai_api.sse
    try:
        if reply.chat:
            yield sse(reply.chunk(0, None))
        async for event in events:
            if "deltas" in event:
                for row, text in event["deltas"]:
                    yield sse(reply.chunk(row, text))
            elif "end" in event:
                for row, (tail, reason) in enumerate(
                    zip(event["tails"], event["finish_reasons"], strict=True)
                ):
                    if tail:
                        yield sse(reply.chunk(row, tail))
                    yield sse(reply.chunk(row, "", reason))
                if reply.include_usage:
                    yield sse(reply.usage_chunk(event["end"]))
        yield sse("[DONE]")
    except ApiError as exc:
        yield sse(openai_api.OpenAIError.of(exc, params).body())
    finally:
        stream.cancel()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP front: parses and validates requests, hands them to the generator, times out."""

    def __init__(self, config: ServeConfig, generator: DeploymentHandle) -> None:
        self.config, self.generator = config, generator
        _BearerAuth.use(config.auth.api_keys() if config.auth.enabled else [])
        self._pool = Pool.open(config.pool) if config.pool else None
        self.catalog = Catalog(config, self._pool)
        self.created = int(time.time())  # the `created` of /v1/models

    @api.post(
        "/v1/restyle",
        response_model=RestyleResponse,
        responses=_ERRORS,
        openapi_extra=_request_body(RestyleRequest),
    )
    async def restyle(self, request: Request) -> Any:
        """Restyle texts with a named adapter, or per sentence with retrieved adapters."""
        limits = self.config.limits
        body = parse_restyle(await _json_body(request, limits.max_body_bytes), limits)
        timeout = body.timeout_s or limits.request_timeout_s
        return await _answer(self._route(body).restyle.remote(body), timeout)

    def _route(self, body: RestyleRequest) -> DeploymentHandle:
        """The generator handle for a request: a named adapter's requests carry it as the
        multiplexed model id, so Serve routes them to a replica that holds it. Only names in
        the catalog (the router remembers every id it sees); a source a pool commit added
        after this replica started goes unrouted, to any replica, which serves it too."""
        if body.mode == "adapted" and body.style in self.catalog.entries:
            return self.generator.options(multiplexed_model_id=body.style)
        return self.generator

    @_openai_post("/v1/completions", openai_api.CompletionRequest)
    async def completions(self, request: Request) -> Any:
        """OpenAI-compatible: `prompt` (a string or a list) restyled as `model` says."""
        return await self._openai(request, openai_api.CompletionRequest)

    @_openai_post("/v1/chat/completions", openai_api.ChatRequest)
    async def chat_completions(self, request: Request) -> Any:
        """OpenAI-compatible: the last user message restyled as `model` says."""
        return await self._openai(request, openai_api.ChatRequest)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """OpenAI-compatible: every `model` a request may name (styles and pool modes)."""
        return {"object": "list", "data": openai_api.models(self.catalog, self.created)}

    @api.get("/v1/models/{model}", responses=_OPENAI_ERRORS)
    async def model(self, model: str) -> dict[str, Any]:
        """OpenAI-compatible: one model (404 in OpenAI's shape when unknown)."""
        openai_api.parse_model(model, self.catalog)
        [found] = [m for m in openai_api.models(self.catalog, self.created) if m["id"] == model]
        return found

    async def _openai(
        self, request: Request, kind: type[openai_api.CompletionRequest | openai_api.ChatRequest]
    ) -> Any:
        """Translate to a `RestyleRequest`, restyle (or stream), answer in OpenAI's shape."""
        limits, params, stream, handed_over = self.config.limits, None, None, False
        try:
            body = await _json_body(request, limits.max_body_bytes)
            translated = openai_api.translate(kind, body, limits, self.catalog)
            params, reply = translated.params, openai_api.Reply(translated)
            # unstreamed too: the stream's end says how each row finished (eos or length)
            streaming = self._route(translated.restyle).options(stream=True).restyle_stream
            stream = cast(
                DeploymentResponseGenerator,
                streaming.remote(translated.restyle, translated.body.stream),
            )
            events = _events(stream, time.monotonic() + limits.request_timeout_s)
            await anext(events)  # accepted: refusals are HTTP errors, not stream events
            if translated.body.stream:
                handed_over = True
                return StreamingResponse(
                    _sse(events, stream, reply, params), media_type="text/event-stream"
                )
            async for event in events:
                if "end" in event:
                    return reply.whole(event["end"], event["finish_reasons"])
            raise ApiError(503, "unavailable", None, "the generator ended without an answer")
        except ApiError as exc:
            raise openai_api.OpenAIError.of(exc, params) from None
        finally:
            if stream is not None and not handed_over:
                stream.cancel()  # done, refused, or timed out: nothing left on the replica

    @api.get("/v1/styles")
    async def styles(self) -> dict[str, Any]:
        """Styles a request may name, and the modes each serves."""
        return {"styles": self.catalog.describe()}

    @api.get("/v1/pool", responses={404: {"model": ErrorBody}})
    async def pool_summary(self) -> dict[str, Any]:
        """The weight pool behind instance and mixture modes."""
        pool = self._pool
        if pool is None:
            raise ApiError(404, "no_pool", None, "this server has no weight pool")
        return {
            "uri": pool.uri,
            "generation": pool.generation,
            "base_model": pool.base_model,
            "featurizer": pool.featurizer,
            "lora": pool.lora_config,
            "sources": [
                {"name": n, "cluster": int(c), "n_examples": int(k)}
                for n, c, k in zip(pool.sources, pool.cluster_of, pool.n_examples, strict=True)
            ],
            "clusters": pool.cluster_members,
            "retrieval": self.config.retrieval.model_dump(by_alias=True),
        }

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> PlainTextResponse:
        """Prometheus text: this application's `ray_twist_*` metrics (requests, latency,
        rows per forward pass, retrieval / merge / generate time) and Ray Serve's
        `ray_serve_*`, as the nodes' metrics agents last exported them (every few seconds).
        Behind the API keys when they are set, like every route but /healthz and the docs."""
        text = await scrape(serve.get_replica_context().app_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/healthz", responses={503: {"model": ErrorBody}})
    async def healthz(self) -> dict[str, Any]:
        """200 when a generator replica answers within 5 s (else 503 or 504)."""
        stats = await _answer(self.generator.stats.remote(), 5.0)
        return {"status": "ok", "generator": stats["replica"]}


def build_app(config: ServeConfig) -> serve.Application:
    """The Serve application for a config (GPUs resolved against the running cluster)."""
    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    generator = cast(Deployment, Generator).options(**config.generator.options(gpus)).bind(config)
    return cast(Deployment, Ingress).options(**config.ingress.options(gpus)).bind(config, generator)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path: ray_twist.serve:app_builder` in a Serve config file; `args` is a
    ServeConfig as a mapping."""
    try:
        config = ServeConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "serve config args")) from None
    return build_app(config)


def prepare(config: ServeConfig) -> ServeConfig:
    """The config as the driver sends it to the replicas: local paths made absolute (replicas
    run in other working directories), and the base model checked before anything starts:
    a bare encoder (untrained cross-attention) is refused unless `allow_untrained_base`."""
    from ray_twist.backbone import absolute_model_path, check_trained_base

    styles = {
        name: style.model_copy(
            update={
                "adapter": absolute(style.adapter),
                "examples": absolute_or_none(style.examples),
            }
        )
        for name, style in config.styles.items()
    }
    pool = absolute_or_none(config.pool)
    auth = config.auth.model_copy(
        update={"api_keys_file": absolute_or_none(config.auth.api_keys_file)}
    )
    update: dict[str, Any] = {"pool": pool, "styles": styles, "auth": auth}
    if config.base_model is not None:
        update["base_model"] = absolute_model_path(config.base_model)
    if config.featurizer is not None:
        update["featurizer"] = absolute_model_path(config.featurizer)
    config = config.model_copy(update=update)
    if not config.allow_untrained_base:
        base = config.base_model or (Pool.open(pool).base_model if pool else None)
        if base:
            check_trained_base(base)
    return config


def run(config: ServeConfig | str) -> str:
    """Start Ray (or join RAY_ADDRESS) and Serve, deploy, return the endpoint URL."""
    if not isinstance(config, ServeConfig):
        config = load_yaml(config, ServeConfig)
    config = prepare(config)
    if not ray.is_initialized():
        ray.init()  # joins the cluster at RAY_ADDRESS when set
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
    return f"http://{config.http.host}:{config.http.port}{config.route_prefix.rstrip('/')}"


def _stop_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM stops `twist serve` the way Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


def _undeploy(name: str, timeout_s: float, shutdown_ray: bool) -> None:
    """Delete the app, waiting at most `timeout_s` (Serve would wait up to each replica's
    graceful shutdown time, 20 s by default, for requests in flight), then, with
    `shutdown_ray` (this process started Ray), disconnect from Ray, which stops the local
    cluster `ray.init` started (a joined cluster finishes the deletion on its own). A caller
    that had Ray running already (a notebook, a test session) keeps it."""
    if not ray.is_initialized():
        return
    done = threading.Event()

    def delete() -> None:
        try:
            serve.delete(name)
        except Exception as exc:  # not deployed yet, or Serve never started
            print(f"undeploy {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            done.set()

    threading.Thread(target=delete, name="undeploy", daemon=True).start()
    done.wait(timeout_s)
    if shutdown_ray:
        ray.shutdown()


def serve_main(config_path: str, allow_untrained_base: bool = False) -> int:
    """`twist serve --config FILE`: deploy, print the URL, block until Ctrl-C or SIGTERM,
    then undeploy and stop Ray within `STOP_TIMEOUT_S` + Ray's own shutdown (a few s). A
    signal during startup stops it the same way."""
    try:
        config = load_yaml(config_path, ServeConfig)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if allow_untrained_base:
        config = config.model_copy(update={"allow_untrained_base": True})
    owns_ray = not ray.is_initialized()
    # SIGTERM acts as Ctrl-C; `ray.init` replaces this with its own `sys.exit(SIGTERM)`
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        url = run(config)
        print(f"serving on {url}  (API docs: {url}/docs); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        print("stopping", file=sys.stderr, flush=True)
    finally:
        _undeploy(config.name, STOP_TIMEOUT_S, shutdown_ray=owns_ray)
        signal.signal(signal.SIGTERM, previous_handler)
    return 0
