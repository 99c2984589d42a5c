"""Benchmark: the Serve endpoint under a bounded load on loopback, per mode and concurrency.

    python bench/serve.py            # small T5 (d=256, 4+4 layers), 8 sources, 64 styles
    python bench/serve.py --quick    # the test-size tiny T5, fewer requests, about a minute

Scenarios (one text per request, greedy, exactly `--max-new-tokens` tokens: the bench's base
model has no eos, so every request does the same work):
    shared     adapted mode, every request the same adapter       (the anchor)
    adapters   adapted mode, request i uses adapter i mod 64      (up to 64 adapters per batch)
    instance   per-sentence retrieval + rank-q SVD merge          (the paper's method per row)
    inst-tts   instance with merge_order truncate_then_sum        (no SVD per row; rank ≤ k·q)
    mixture    per-sentence untruncated mixture of the sources
At each concurrency level C, C client workers send requests back to back until
max(`--requests`, 2·C) have completed. Reported: requests/s, p50/p99 client latency, output
tokens/s (tokens/s ratio vs "shared" at the same level: goals ≥ 0.9 for instance, ≥ 0.95 for
64 distinct adapters in one batch), and the share of each request's latency its batch spent
in retrieval + merge (goal ≤ 5 %). Then, in process without HTTP: one forward pass of
`--pass-rows` texts per scenario against the shared adapter merged into the weights
("merged": plain `generate`, no LoRA work), and one single-text request per scenario, whose
median the HTTP p50 at concurrency 1 is compared with (HTTP overhead, goal ≤ 10 %). Prints
tables and writes JSON (default bench/results/serve.json).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
from common import write_result
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from ray import serve

from ray_twist.backbone import (
    build_small_t5,
    build_tiny_backbone,
    default_lora_targets,
    load_backbone,
)
from ray_twist.features import TaskKey
from ray_twist.generation import GenerationSettings, encode, generate_ids
from ray_twist.pool import SourceEntry, add_sources
from ray_twist.serve import RestyleRequest, RestyleResponse, ServeConfig, run
from ray_twist.serve.engine import Engine, Work

N_STYLES = 64
WORDS = ["the", "a", "quiet", "river", "old", "city", "green", "light", "small", "dog", "runs"]
SCENARIOS = {
    "shared": lambda i: {"style": "s0"},
    "adapters": lambda i: {"style": f"s{i % N_STYLES}"},
    "instance": lambda i: {"mode": "instance"},
    "inst-tts": lambda i: {"mode": "instance", "merge_order": "truncate_then_sum"},
    "mixture": lambda i: {"mode": "mixture"},
}


def build_world(root: Path, quick: bool, n_sources: int = 8, n_styles: int = N_STYLES) -> dict:
    """Base model, a pool of random rank-8 sources, random rank-8 named styles."""
    base = build_tiny_backbone("t5", root / "base") if quick else build_small_t5(root / "base")
    model = load_backbone(base).model
    model.generation_config.eos_token_id = None  # fixed-length decoding ("ignore_eos"):
    model.generation_config.save_pretrained(base)  # every request does the same work
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=default_lora_targets(model.config),
                      init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(load_backbone(base).model, lora)
    rng = np.random.default_rng(0)

    def adapter(path: Path, seed: int) -> str:
        torch.manual_seed(seed)  # one model, its LoRA weights drawn afresh per adapter
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", init_lora_weights=False)
        peft_model.save_pretrained(str(path))
        return str(path)

    entries = [
        SourceEntry(f"src{i}", adapter(root / f"src{i}", i),
                    TaskKey(rng.normal(size=384), rng.normal(size=384), n_examples=100))
        for i in range(n_sources)
    ]  # fmt: skip
    add_sources(root / "pool", entries, base_model=base)
    styles = {f"s{i}": adapter(root / f"s{i}", 100 + i) for i in range(n_styles)}
    return {"base": base, "pool": str(root / "pool"), "styles": styles}


def text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 5) % len(WORDS)] for j in range(6 + i % 10))


async def load(url: str, scenario: str, concurrency: int, n: int, max_new: int) -> dict:
    """C workers, back-to-back requests, until n have completed (bounded)."""
    results: list[dict] = []
    counter = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            body = {"texts": [text(i)], "max_new_tokens": max_new, **SCENARIOS[scenario](i)}
            start = time.perf_counter()
            r = await client.post("/v1/restyle", json=body)
            latency = time.perf_counter() - start
            out = r.json() if r.status_code == 200 else {}
            results.append({"status": r.status_code, "latency": latency, **out})

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    latency = np.array([r["latency"] for r in ok])
    timing = {k: float(np.mean([r["timing"][k] for r in ok])) for k in ok[0]["timing"]}
    overhead = [
        (r["timing"]["retrieval_ms"] + r["timing"]["merge_ms"]) / (1000 * r["latency"]) for r in ok
    ]
    return {
        "scenario": scenario,
        "concurrency": concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "seconds": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": len(ok) * max_new / wall,  # decoding never stops early (no eos)
        "p50_ms": 1000 * float(np.percentile(latency, 50)),
        "p99_ms": 1000 * float(np.percentile(latency, 99)),
        "mean_batch_rows": timing["batch_rows"],
        "mean_timing": timing,
        "retrieval_merge_share": float(np.mean(overhead)),
    }


def single_pass(
    world: dict, config: ServeConfig, n_rows: int, max_new: int, rounds: int = 5
) -> tuple[list[dict], dict[str, float]]:
    """In process, no HTTP: one forward pass of `n_rows` texts per scenario, against the
    shared adapter merged into the weights (no LoRA work at all). Scenarios take turns for
    `rounds` rounds and each keeps its fastest pass, so load bursts hit all alike. Also
    each scenario's median seconds for one single-text request (what HTTP adds to)."""
    torch.set_num_threads(int(config.generator.num_cpus))
    engine = Engine(config)
    merged = load_backbone(world["base"])
    merged.model = PeftModel.from_pretrained(merged.model, world["styles"]["s0"]).merge_and_unload()
    texts = [text(i) for i in range(n_rows)]
    ids = encode(merged, texts)
    settings = GenerationSettings(max_new_tokens=max_new)
    runs: dict[str, Callable[[], list[RestyleResponse] | list[str]]] = {
        "merged": lambda: generate_ids(merged, ids, settings, n_rows)
    }
    singles: dict[str, Callable[[], list[RestyleResponse]]] = {}

    def works(scenario: str, indices: range) -> list[Work]:
        out = []
        for i in indices:
            body = {"texts": [text(i)], "max_new_tokens": max_new, **SCENARIOS[scenario](i)}
            work = engine.prepare(RestyleRequest.model_validate(body))
            if work.style is not None and work.request.mode == "adapted":
                work.adapter = engine.load_adapter(work.style.name)
            out.append(work)
        return out

    for scenario in SCENARIOS:
        runs[scenario] = functools.partial(engine.run, works(scenario, range(n_rows)))
        singles[scenario] = functools.partial(engine.run, works(scenario, range(1)))
    best: dict[str, tuple[float, object]] = {}
    single_s: dict[str, list[float]] = {scenario: [] for scenario in singles}
    for _ in range(rounds):
        for scenario, fn in runs.items():
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
            if scenario not in best or seconds < best[scenario][0]:
                best[scenario] = (seconds, result)
        for scenario, one in singles.items():
            for _ in range(3):
                start = time.perf_counter()
                one()
                single_s[scenario].append(time.perf_counter() - start)
    out = []
    for scenario, (seconds, result) in best.items():
        row: dict = {"scenario": scenario, "seconds": seconds}
        if scenario != "merged":
            timing = result[0].timing  # type: ignore[index]
            spent = timing.retrieval_ms + timing.merge_ms
            row["retrieval_merge_share"] = spent / (spent + timing.generate_ms)
            row["timing"] = timing.model_dump()
        row["tokens_per_s"] = n_rows * max_new / seconds
        row["tokens_per_s_vs_merged"] = row["tokens_per_s"] / (n_rows * max_new / best["merged"][0])
        out.append(row)
    return out, {scenario: float(np.median(t)) for scenario, t in single_s.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--requests", type=int, default=None, help="per scenario and level")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--pass-rows", type=int, default=16, help="texts per in-process pass")
    parser.add_argument("--generator-cpus", type=float, default=float(os.cpu_count() or 1))
    parser.add_argument("--out", default="bench/results/serve.json")
    args = parser.parse_args()
    levels = args.concurrency or ([1, 8] if args.quick else [1, 4, 16, 64])
    n_requests = args.requests or (24 if args.quick else 64)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # replicas at the in-process anchor's niceness (see common.init_ray_fairly)
    os.environ.setdefault("RAY_worker_niceness", "0")  # noqa: SIM112 - Ray's own spelling
    root = Path(tempfile.mkdtemp(prefix="twist-bench-serve-"))
    world = build_world(root, args.quick)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig.model_validate({
        "name": "twist-bench", "pool": world["pool"], "styles": world["styles"],
        "retrieval": {"rank": 8, "top_k": 4},
        "limits": {"max_texts": 4, "max_new_tokens": max(32, args.max_new_tokens)},
        "batching": {"max_batch_rows": max(levels), "batch_wait_timeout_s": 0.005},
        "generator": {"num_replicas": 1, "num_cpus": args.generator_cpus,
                      "max_adapters_per_replica": N_STYLES},
        "ingress": {"num_replicas": 1, "num_cpus": 0},
        "http": {"host": "127.0.0.1", "port": port},
    })  # fmt: skip
    ray.init(num_cpus=max(2, int(args.generator_cpus) + 1), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})  # fmt: skip
    url = run(config)
    rows = []
    try:
        for scenario in SCENARIOS:  # warm-up: every adapter cached, code paths compiled
            asyncio.run(load(url, scenario, 8, N_STYLES, args.max_new_tokens))
        for level in levels:
            for scenario in SCENARIOS:
                n = max(n_requests, 2 * level)
                rows.append(asyncio.run(load(url, scenario, level, n, args.max_new_tokens)))
    finally:
        serve.shutdown()
        ray.shutdown()
    passes, single_s = single_pass(world, config, args.pass_rows, args.max_new_tokens)
    shared = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["scenario"] == "shared"}
    for r in rows:
        r["tokens_per_s_vs_shared"] = r["tokens_per_s"] / shared[r["concurrency"]]
        if r["concurrency"] == 1:  # one request per batch: HTTP p50 vs the same in process
            r["in_process_ms"] = 1000 * single_s[r["scenario"]]
            r["http_overhead"] = r["p50_ms"] / r["in_process_ms"] - 1

    print(f"\n{'scenario':<10}{'conc':>5}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'tok/s':>8}"
          f"{'vs shared':>10}{'rows/batch':>11}{'retr+merge':>11}{'failed':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['scenario']:<10}{r['concurrency']:>5}{r['requests_per_s']:>8.1f}"
              f"{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['tokens_per_s']:>8.0f}"
              f"{r['tokens_per_s_vs_shared']:>10.2f}{r['mean_batch_rows']:>11.1f}"
              f"{100 * r['retrieval_merge_share']:>10.1f}%{r['failed']:>7}")  # fmt: skip
    print("\nHTTP at concurrency 1: p50 vs one single-text request in process (median)")
    print(f"{'scenario':<10}{'HTTP p50 ms':>12}{'in process ms':>14}{'overhead':>9}")
    for r in rows:
        if "http_overhead" in r:
            print(f"{r['scenario']:<10}{r['p50_ms']:>12.0f}{r['in_process_ms']:>14.0f}"
                  f"{100 * r['http_overhead']:>8.1f}%")  # fmt: skip
    print(f"\none forward pass of {args.pass_rows} texts in process (no HTTP), best of 5")
    print(f"{'scenario':<10}{'ms':>8}{'tok/s':>8}{'vs merged':>10}{'retr+merge':>11}")
    for r in passes:
        share = f"{100 * r['retrieval_merge_share']:.1f}%" if "timing" in r else "-"
        print(f"{r['scenario']:<10}{1000 * r['seconds']:>8.0f}{r['tokens_per_s']:>8.0f}"
              f"{r['tokens_per_s_vs_merged']:>10.2f}{share:>11}")  # fmt: skip
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch_threads": int(args.generator_cpus),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    settings = {"quick": args.quick, "max_new_tokens": args.max_new_tokens,
                "requests": n_requests, "levels": levels, "pass_rows": args.pass_rows}  # fmt: skip
    write_result(
        args.out, {"machine": machine, "settings": settings, "http": rows, "single_pass": passes}
    )


if __name__ == "__main__":
    main()
