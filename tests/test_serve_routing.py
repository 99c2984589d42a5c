"""Serving across replicas on a real local Ray Serve over loopback HTTP: requests for a named
adapter are routed to the replica that holds it, the generator autoscales 1 → 2 → 1 under a
bounded load with no failed request, and /metrics returns the replicas' metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray_nodes import free_port

from ray_twist.backbone import save_random_lora
from ray_twist.serve import ServeConfig, run

STYLES = ("north", "south")
TEXTS = ["the old dog sleeps near the river", "a green sun rises"]


@pytest.fixture(scope="module")
def world(tiny_backbones, tmp_path_factory, ray_session) -> dict:
    """A tiny T5 and two registered styles (no pool: no featurizer to load per replica)."""
    root = tmp_path_factory.mktemp("routing")
    base = tiny_backbones["t5"]
    styles = {n: save_random_lora(base, root / n, seed=i, rank=2) for i, n in enumerate(STYLES)}
    yield {"base": base, "styles": styles, "port": free_port()}
    serve.shutdown()


def _deploy(world: dict, name: str, generator: dict) -> str:
    config = {
        "name": name,
        "base_model": world["base"],
        "styles": world["styles"],
        "limits": {"max_texts": 4, "max_new_tokens": 12, "default_max_new_tokens": 6},
        "batching": {"max_batch_rows": 16, "batch_wait_timeout_s": 0.01},
        "ingress": {"num_replicas": 1, "num_cpus": 0.1},
        "generator": {"num_cpus": 0.5, "max_ongoing_requests": 64, **generator},
        "http": {"host": "127.0.0.1", "port": world["port"]},
    }
    return run(ServeConfig.model_validate(config))


async def _send(url: str, bodies: list[dict], concurrency: int) -> list[int]:
    """POST every body to /v1/restyle, `concurrency` at a time; the status codes."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(body: dict) -> int:
            async with gate:
                return (await client.post("/v1/restyle", json=body)).status_code

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def _replica_stats(app: str, replicas: int) -> dict[str, dict]:
    """`stats()` of every generator replica: asked until `replicas` distinct ids answered
    (unrouted calls land on a random replica)."""
    handle = serve.get_deployment_handle("Generator", app_name=app)
    seen: dict[str, dict] = {}
    for _ in range(60):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            break
    assert len(seen) == replicas, seen
    return seen


@pytest.fixture(scope="module")
def routed(world) -> str:
    """An app with two generator replicas."""
    yield _deploy(world, "twist-routing", {"num_replicas": 2, "max_adapters_per_replica": 4})
    serve.delete("twist-routing")


def test_named_adapters_route_to_the_replica_that_holds_them(routed) -> None:
    """Warm-up: one request per style, a moment apart (for the replicas to report their
    adapters to the routers); Serve sends the second style to the replica with fewer
    adapters. Then 2 × 24 interleaved concurrent requests: each style's land on the replica
    that loaded it, and neither replica loads the other's style."""
    for style in STYLES:
        assert asyncio.run(_send(routed, [{"texts": TEXTS[:1], "style": style}], 1)) == [200]
        time.sleep(1.5)
    bodies = [{"texts": TEXTS, "style": s} for _ in range(24) for s in STYLES]
    statuses = asyncio.run(_send(routed, bodies, concurrency=8))
    assert statuses == [200] * len(bodies)
    stats = _replica_stats("twist-routing", 2)
    holder = {s: r for r, st in stats.items() for s in st["served"] if st["adapters"] == [s]}
    total = Counter[str]()
    for st in stats.values():
        total.update(st["served"])
    affinity = {s: stats[holder[s]]["served"][s] / total[s] for s in STYLES if s in holder}
    print(f"\nrouting: per replica {[(r, st['adapters'], st['served']) for r, st in stats.items()]}"
          f"; affinity {affinity}")  # fmt: skip
    assert sorted(st["adapters"][0] for st in stats.values()) == list(STYLES), stats
    assert all(len(st["adapters"]) == 1 and st["loads"] == 1 for st in stats.values()), stats
    assert total == {s: 25 for s in STYLES}
    assert all(a >= 0.9 for a in affinity.values()) and len(affinity) == 2, affinity


def _metric_sums(text: str) -> tuple[dict[str, float], set[str]]:
    """Sample name (with its mode/status labels) → value summed over replicas and nodes; and
    the applications the samples are of."""
    sums: Counter[str] = Counter()
    apps: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            apps.add(sample.labels.get("application", ""))
            tags = ",".join(f"{k}={sample.labels[k]}" for k in ("mode", "status", "le")
                            if k in sample.labels)  # fmt: skip
            sums[f"{sample.name}{{{tags}}}"] += sample.value
    return dict(sums), apps


def test_metrics_route_returns_the_replicas_metrics(routed) -> None:
    """After N requests, /metrics (valid Prometheus text) counts them under the generator's
    request counter and has its histograms and Ray Serve's own metrics, of this app only;
    the node agents export every few seconds, hence the polling."""
    n = 6
    bodies = [{"texts": TEXTS[:1], "style": STYLES[i % 2]} for i in range(n)]
    assert asyncio.run(_send(routed, bodies, concurrency=3)) == [200] * n
    wanted = [f"ray_twist_{h}_{part}" for h in ("request_latency_ms", "batch_rows",
              "retrieval_ms", "merge_ms", "generate_ms") for part in ("bucket", "sum", "count")]  # fmt: skip
    deadline, sums, apps = time.monotonic() + 20, {}, set()
    with httpx.Client(base_url=routed, timeout=30) as client:
        while time.monotonic() < deadline:
            r = client.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            sums, apps = _metric_sums(r.text)
            names = {k.partition("{")[0] for k in sums}
            counted = sums.get("ray_twist_requests_total{mode=adapted,status=200}", 0)
            if counted >= n and names >= set(wanted):
                break
            time.sleep(1)
    assert sums.get("ray_twist_requests_total{mode=adapted,status=200}", 0) >= n, sums
    assert names >= set(wanted), sorted(names)
    assert "ray_serve_deployment_request_counter_total" in names, sorted(names)
    assert apps == {"twist-routing"}, apps
    rows = sums["ray_twist_batch_rows_sum{}"] / sums["ray_twist_batch_rows_count{}"]
    assert rows >= 1


def _replicas(app: str) -> int:
    """Running generator replicas, from `serve.status()`."""
    deployment = serve.status().applications[app].deployments["Generator"]
    return int(deployment.replica_states.get("RUNNING", 0))


def test_generator_autoscales_up_and_down_with_no_failed_request(world) -> None:
    """Short autoscaling delays; 8 clients in a loop keep ~8 requests in flight against a
    target of 2 per replica: the generator goes 1 → 2 replicas; once the load stops it goes
    back to 1. Every request of the load gets a 200."""
    serve.delete("twist-routing")  # free its CPUs
    app = "twist-scaling"
    url = _deploy(world, app, {"autoscaling": {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
        "upscale_delay_s": 1, "downscale_delay_s": 2, "look_back_period_s": 1,
        "metrics_interval_s": 0.25}})  # fmt: skip
    try:
        assert _replicas(app) == 1
        statuses: list[int] = []
        stop = threading.Event()

        def client() -> None:
            body = {"texts": TEXTS, "style": STYLES[0], "max_new_tokens": 12}
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    try:
                        statuses.append(c.post("/v1/restyle", json=body).status_code)
                    except httpx.HTTPError:
                        statuses.append(0)

        start = time.monotonic()
        clients = [threading.Thread(target=client) for _ in range(8)]
        for c in clients:
            c.start()
        try:
            while _replicas(app) < 2 and time.monotonic() - start < 40:
                time.sleep(0.25)
            up = time.monotonic() - start
            time.sleep(1)  # a little load on two replicas
        finally:
            stop.set()
            for c in clients:
                c.join()
        stopped = time.monotonic()
        while _replicas(app) > 1 and time.monotonic() - stopped < 30:
            time.sleep(0.25)
        down = time.monotonic() - stopped
        print(f"\nautoscaling: 1 → {2 if up < 40 else 1} replicas {up:.1f} s into the load; "
              f"{len(statuses)} requests, statuses {Counter(statuses)}; back to "
              f"{_replicas(app)} {down:.1f} s after it stopped")  # fmt: skip
        assert up < 40, "never scaled up"
        assert statuses and set(statuses) == {200}, Counter(statuses)
        assert _replicas(app) == 1 and down < 30
    finally:
        serve.delete(app)
