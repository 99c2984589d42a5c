"""Metrics of the Serve application: recorded in the replicas, gathered for `GET /metrics`.

The generator replicas record ray-twist's metrics with `ray.serve.metrics` (Serve tags each
with application, deployment and replica); Ray exports them, with its own `ray_serve_*`
metrics, from each node's metrics agent (the `MetricsExportPort` of `ray.nodes()`), every
few seconds (Ray's report interval, 10 s by default). `scrape` reads those endpoints and
keeps one application's `ray_twist_*` and `ray_serve_*` series, merged into one valid
Prometheus text (one HELP/TYPE per metric across nodes). A cluster Prometheus can scrape the
node endpoints directly; `/metrics` is for a scraper that only sees the HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.request
from collections.abc import Iterable, Iterator

import ray
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.serve import metrics

from ray_twist.serve.api import ApiError, Timing

logger = logging.getLogger("ray.serve")

PREFIXES = ("ray_twist_", "ray_serve_")  # Ray prefixes custom metric names with "ray_"
LATENCY_MS = [5.0, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000]
STAGE_MS = [0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10_000]
ROWS = [1.0, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class ReplicaMetrics:
    """What a generator replica records: requests and their latency (arrival to answer,
    queueing and batching included) by mode and status, and per forward pass its rows and
    the time of its retrieval, merge and generate stages."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "twist_requests",
            description="restyle requests the generator answered, by mode, HTTP status "
            "(499: cancelled by the caller, e.g. timed out) and method (restyle: /v1/restyle; "
            "restyle_stream: the OpenAI-compatible routes, streamed or not)",
            tag_keys=("mode", "status", "method"),  # type: ignore[arg-type]  # Ray: Tuple[str]
        )
        self.latency = metrics.Histogram(
            "twist_request_latency_ms",
            description="generator time per request, queue and batch wait included",
            boundaries=LATENCY_MS,
            tag_keys=("mode",),
        )
        self.rows = metrics.Histogram(
            "twist_batch_rows", description="texts per forward pass", boundaries=ROWS
        )
        self.stages = {
            stage: metrics.Histogram(
                f"twist_{stage}_ms",
                description=f"{stage} time per forward pass (per-sentence adapters)",
                boundaries=STAGE_MS,
            )
            for stage in ("retrieval", "merge", "generate")
        }

    @contextlib.contextmanager
    def request(self, mode: str, method: str) -> Iterator[None]:
        """Count and time the request answered inside this block, with the status it ends in."""
        start, status = time.perf_counter(), 200
        try:
            yield
        except ApiError as exc:
            status = exc.status
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the caller gave up (timed out, left)
            status = 499
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.requests.inc(tags={"mode": mode, "status": str(status), "method": method})
            self.latency.observe(1000 * (time.perf_counter() - start), tags={"mode": mode})

    def forward_pass(self, timing: Timing) -> None:
        self.rows.observe(timing.batch_rows)
        self.stages["retrieval"].observe(timing.retrieval_ms)
        self.stages["merge"].observe(timing.merge_ms)
        self.stages["generate"].observe(timing.generate_ms)


def _endpoints() -> list[str]:
    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


def _fetch(url: str, app: str, timeout_s: float) -> str:
    """One node's export, cut to the lines that can belong to `app` before parsing (a node
    exports every worker's metrics: hundreds of kB)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            text: str = answer.read().decode()
    except OSError as exc:  # a node whose agent does not answer is left out, not fatal
        logger.warning(f"metrics: {url} did not answer ({exc})")
        return ""
    mine = f'application="{app}"'
    return "\n".join(
        line
        for line in text.splitlines()
        if (line.startswith(("# HELP ", "# TYPE ")) and line[7:].startswith(PREFIXES))
        or (line.startswith(PREFIXES) and mine in line)
    )


class _Families:
    """A collector of parsed families, for `generate_latest`."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def scrape(app: str, timeout_s: float = 5.0) -> str:
    """Prometheus text of application `app`'s `ray_twist_*` and `ray_serve_*` metrics from
    every alive node's metrics agent."""
    texts = await asyncio.gather(
        *(asyncio.to_thread(_fetch, url, app, timeout_s) for url in _endpoints())
    )
    merged: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text + "\n"):
            if not family.samples:
                continue
            into = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            into.samples.extend(family.samples)
    return generate_latest(_Families(merged.values())).decode()
