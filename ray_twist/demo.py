"""`twist demo`: the whole TWIST pipeline, offline, on the local Ray, in minutes.

A recipe over the library's components: build a pool from the synthetic style world (Ray
Train + DeepSpeed, keys with Ray Data), adapt a held-out style from a few examples with a
TWIST and a scratch initialisation, evaluate both side by side, serve the result over HTTP
(a named adapter and per-sentence retrieval), restyle a small corpus in bulk, and say where
every artefact is. The model is a tiny random T5: the point is the pipeline, not the prose.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: The held-out target and the sources; the target's family sibling is in the pool.
TARGET = "sailor"
SOURCES = ["pirate", "shakespearean", "biblical", "shouty", "emphatic", "formal"]
QUICK_SOURCES = ["pirate", "shakespearean", "shouty"]


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of each step: `quick` is for tests and smoke runs."""

    sources: list[str]
    n_per_source: int
    source_steps: int
    target_examples: int
    target_steps: int
    test_examples: int
    corpus_rows: int

    @classmethod
    def make(cls, quick: bool) -> DemoPlan:
        if quick:
            return cls(QUICK_SOURCES, 48, 12, 16, 12, 16, 24)
        return cls(SOURCES, 96, 60, 24, 60, 48, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.loads(response.read()))


def build_config(root: Path, plan: DemoPlan) -> Any:
    from ray_twist.config import BuildPoolConfig

    return BuildPoolConfig.model_validate({
        "base_model": {"tiny": "t5", "seed": 0},
        "lora": {"r": 8, "alpha": 16},
        "sources": [{"synthetic": {"styles": plan.sources, "n_per_style": plan.n_per_source,
                                   "seed": 0}}],
        "training": {"epochs": 50, "max_steps": plan.source_steps, "lr": 0.01, "batch_size": 8,
                     "max_source_length": 48, "max_target_length": 48,
                     "checkpoint_every_steps": max(plan.source_steps // 3, 1)},
        "deepspeed": {"zero_stage": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
        "pool": str(root / "pool"),
        "storage_path": str(root / "train"),
    })  # fmt: skip


def run_demo(workdir: str = "runs/demo", quick: bool = False) -> dict[str, str]:
    """Run every step, print as it goes, and return {artefact: path}."""
    import ray

    from ray_twist.adapt import adapt
    from ray_twist.build import build_pool, summary_table
    from ray_twist.config import AdaptConfig
    from ray_twist.data import make_task, neutral_sentences, style_corpus, write_task_jsonl
    from ray_twist.evaluate import evaluate_adapter
    from ray_twist.pool import Pool
    from ray_twist.restyle import restyle_corpus

    console = Console()
    plan = DemoPlan.make(quick)
    root = Path(workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(log_to_driver=False)

    console.rule(f"1/5 pool: {len(plan.sources)} synthetic source styles on a tiny T5")
    report = build_pool(build_config(root, plan))
    console.print(summary_table(report))
    base_model = Pool.open(report.pool).base_model

    console.rule(f"2/5 adapt the held-out style {TARGET!r} from {plan.target_examples} examples")
    target = make_task(TARGET, plan.target_examples, seed=101)
    test_uri = write_task_jsonl(make_task(TARGET, plan.test_examples, seed=202),
                                root / "target_test.jsonl")  # fmt: skip
    labelled = root / "style_labels.jsonl"
    labelled.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                for t, y in style_corpus(40, seed=303)))  # fmt: skip
    adapters, reports = {}, {}
    for init in ("twist", "scratch"):
        config = AdaptConfig.model_validate({
            "init": init, "rank": 8,
            "training": {"epochs": 50, "max_steps": plan.target_steps, "lr": 0.01,
                         "batch_size": 8, "val_fraction": 0.25, "checkpoint_every_steps": None},
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
        })  # fmt: skip
        result = adapt(target, str(root / f"adapter_{init}"), config, pool=report.pool)
        adapters[init] = result.adapter_dir
        if result.weights:
            top = sorted(result.weights.items(), key=lambda kv: -kv[1])[:3]
            console.print("retrieval (top 3): " + ", ".join(f"{k} {v:.2f}" for k, v in top))

    console.rule("3/5 evaluate on held-out target examples")
    table = Table("init", "style acc (classifier)", "style acc (rules)", "BLEU", "G-score")
    for init, adapter_dir in adapters.items():
        ev = evaluate_adapter(adapter_dir, test_uri, style=TARGET, style_data=str(labelled),
                              out=str(root / f"eval_{init}"))  # fmt: skip
        reports[init] = ev
        table.add_row(init, _pct(ev.acc), _pct(ev.acc_rule), f"{ev.bleu:.1f}", _pct(ev.g))
    console.print(table)

    console.rule("4/5 serve over HTTP: a named adapter and per-sentence retrieval")
    served = _serve_round_trip(report.pool, adapters["twist"], console)

    console.rule("5/5 restyle a corpus in bulk with Ray Data")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": s}) + "\n"
                              for i, s in enumerate(neutral_sentences(plan.corpus_rows, 404))))  # fmt: skip
    summary = restyle_corpus(str(corpus), str(root / "restyled"), base_model,
                             adapters["twist"], style=TARGET)  # fmt: skip
    console.print(f"restyled {summary['rows_written']} rows, {summary['errors']} errors")

    artefacts = {
        "pool": report.pool, "base model": base_model,
        "twist adapter": adapters["twist"], "scratch adapter": adapters["scratch"],
        "evaluations": str(root / "eval_twist") + ", " + str(root / "eval_scratch"),
        "served responses": served, "restyled corpus": str(root / "restyled"),
        "training checkpoints": str(root / "train"),
    }  # fmt: skip
    where = Table("artefact", "where")
    for name, path in artefacts.items():
        where.add_row(name, path)
    console.rule(f"done in {time.perf_counter() - started:.0f} s")
    console.print(where)
    return artefacts


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _serve_round_trip(pool: str, adapter: str, console: Console) -> str:
    """Deploy the app, restyle a few sentences in `adapted` and `instance` modes, undeploy."""
    from ray import serve

    from ray_twist.data import neutral_sentences
    from ray_twist.serve import ServeConfig, run

    config = ServeConfig.model_validate({"pool": pool, "styles": {TARGET: adapter},
                                         "http": {"port": _free_port()}})  # fmt: skip
    url = run(config)
    texts = neutral_sentences(3, seed=505)
    out = Path(adapter).parent / "served.json"
    try:
        answers = {mode: _post(f"{url}/v1/restyle", {"texts": texts, "mode": mode,
                                                     "style": TARGET if mode == "adapted" else None,
                                                     "max_new_tokens": 24})
                   for mode in ("adapted", "instance")}  # fmt: skip
    finally:
        serve.shutdown()
    for mode, answer in answers.items():
        for text, output in zip(texts, answer["outputs"], strict=True):
            console.print(f"[{mode}] {text}\n   → {output}")
    out.write_text(json.dumps({"texts": texts, **answers}, indent=2))
    return str(out)
