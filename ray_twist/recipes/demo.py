"""`twist demo`: the whole TWIST pipeline, offline, on the local Ray, in minutes.

A recipe over the library's components, on the synthetic style world (ray_twist.data):

1. **base model** — the world's tiny T5, pre-trained to copy neutral sentences
   (`ray_twist.recipes.study.world`), so that LoRAs learn styles; built once per workdir;
2. **pool** — one LoRA per source style (Ray Train + DeepSpeed), keys on Ray Data, one commit
   (`build.build_pool`; a re-run skips sources already in the pool);
3. **adapt** — the held-out style `sailor` (its family sibling `pirate` is in the pool) from a
   few examples, with a TWIST and a scratch initialisation: two Ray tasks at once, each
   fine-tuning in Ray Train local mode with DeepSpeed, as the low-resource study does
   (`adapt.adapt`);
4. **evaluate** — both adapters on held-out target examples, side by side (`evaluate`);
5. **serve** — the Serve app over HTTP: the adapted style, and per-sentence retrieval
   (`instance` mode); then `serve.shutdown()`;
6. **restyle** — a small corpus in bulk with Ray Data (`restyle.restyle_corpus`).

It ends with where every artefact is and one line of timing per phase; `demo.json` in the
workdir records both, with the evaluation table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ray_twist.adapt import AdaptConfig
from ray_twist.build.config import BuildPoolConfig
from ray_twist.recipes.study.config import WorldBackboneSettings

__all__ = ["QUICK_SOURCES", "SOURCES", "TARGET", "DemoPlan", "run_demo"]

#: The held-out target; the sources include its family sibling (pirate) and every other family.
TARGET = "sailor"
SOURCES = ["pirate", "shakespearean", "formal", "shouty", "biblical", "emphatic"]
QUICK_SOURCES = ["pirate", "shakespearean", "shouty"]
MANIFEST = "demo.json"
EVAL_TABLE = "eval_table.json"
MODES = ("adapted", "instance")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of each step: `quick` exercises every phase at the smallest useful size."""

    sources: list[str]
    backbone: WorldBackboneSettings
    n_per_source: int
    source_steps: int
    target_examples: int
    target_steps: int
    test_examples: int
    classifier_texts: int  # labelled texts per style for the style classifier
    corpus_rows: int

    @classmethod
    def make(cls, quick: bool) -> DemoPlan:
        if quick:  # every phase, smallest sizes: for tests and smoke runs
            return cls(
                sources=QUICK_SOURCES,
                backbone=WorldBackboneSettings(pretrain_steps=200),
                n_per_source=64,
                source_steps=60,
                target_examples=8,
                target_steps=30,
                test_examples=16,
                classifier_texts=40,
                corpus_rows=24,
            )
        return cls(
            sources=SOURCES,
            backbone=WorldBackboneSettings(pretrain_steps=600),
            n_per_source=200,
            source_steps=200,
            target_examples=10,
            target_steps=100,
            test_examples=64,
            classifier_texts=100,
            corpus_rows=128,
        )


class _Phases:
    """Wall-clock seconds per phase, with a numbered rule as each one starts."""

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.total = console, total
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, title: str) -> Iterator[None]:
        self.console.rule(f"{len(self.seconds) + 1}/{self.total} {name}: {title}")
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.loads(response.read()))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def world_backbone(root: Path, spec: WorldBackboneSettings) -> str:
    """The world T5 under `root`, keyed by its settings: built once, then reused by every
    re-run with the same settings."""
    from ray_twist.recipes.study.world import build_world_backbone

    key = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:8]
    return build_world_backbone(str(root / f"base_model-{key}"), spec)


def pool_config(root: Path, base_model: str, plan: DemoPlan) -> BuildPoolConfig:
    """The study's source recipe: rank-8 LoRAs on every linear layer, lr 0.01, batch 8."""
    return BuildPoolConfig.model_validate(
        {
            "base_model": {"path": base_model},
            "lora": {"r": 8, "alpha": 8, "target_modules": ["q", "k", "v", "o", "wi", "wo"]},
            "sources": [{"synthetic": {"styles": plan.sources, "n_per_style": plan.n_per_source}}],
            "training": {
                "epochs": 1000,
                "max_steps": plan.source_steps,
                "lr": 0.01,
                "batch_size": 8,
                "max_source_length": 48,
                "max_target_length": 48,
                "checkpoint_every_steps": max(plan.source_steps // 4, 1),  # live progress
            },
            "deepspeed": {"zero_stage": 2},
            "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
            "pool": str(root / "pool"),
            "storage_path": str(root / "train"),
        }
    )


def adapt_config(init: str, plan: DemoPlan, root: Path) -> AdaptConfig:
    """The study's adaptation: a fixed budget of steps at lr 3e-3, no validation split
    (a fifth of a few examples would be a one-example validation loss)."""
    return AdaptConfig.model_validate(
        {
            "init": init,
            "rank": 8,
            "training": {
                "epochs": 1000,
                "max_steps": plan.target_steps,
                "lr": 3e-3,
                "batch_size": 8,
                "max_source_length": 48,
                "max_target_length": 48,
                "val_fraction": 0.0,
                "checkpoint_every_steps": None,
            },
            "deepspeed": {"zero_stage": 2},
            "resources": {"num_workers": 0},  # Ray Train local mode, inside the adapt task
            "storage_path": str(root / "train"),
        }
    )


def run_demo(workdir: str = "runs/demo", quick: bool = False) -> dict[str, Any]:
    """Run every phase, print as it goes, write `demo.json`; return what it records:
    {"artefacts": {name: path}, "phases": {name: seconds}, "eval": [rows], "served": {...}}."""
    import ray
    from transformers.utils import logging as transformers_logging

    from ray_twist.adapt import adapt
    from ray_twist.build import build_pool, summary_table
    from ray_twist.data import make_task, neutral_sentences, style_corpus, write_task_jsonl
    from ray_twist.evaluate import StyleClassifier, TestSet, evaluate_adapter

    console = Console(record=True)
    if not console.is_terminal:  # logs and pipes: wide enough for the tables
        console.width = 120
    transformers_logging.disable_progress_bar()
    plan = DemoPlan.make(quick)
    root = Path(workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    phase = _Phases(console, 6)
    details: dict[str, Any] = {}  # inside phases: the build's and the adaptations' own timings
    if not ray.is_initialized():
        ray.init(log_to_driver=False)

    with phase("base model", "a tiny T5 over the synthetic world, pre-trained to copy"):
        with console.status("building (first run only) …"):
            base_model = world_backbone(root, plan.backbone)
        console.print(f"base model: {base_model}")

    with phase("pool", f"{len(plan.sources)} source styles, Ray Train + DeepSpeed, Ray Data keys"):
        report = build_pool(pool_config(root, base_model, plan))
        console.print(summary_table(report))
        details["pool"] = {k: round(v, 1) for k, v in report.phases.items()}

    with phase("adapt", f"held-out {TARGET!r} from {plan.target_examples} examples"):
        examples = make_task(TARGET, plan.target_examples + plan.test_examples, seed=101)
        target = examples.take(list(range(plan.target_examples)))
        test = TestSet.from_task(examples.take(list(range(plan.target_examples, len(examples)))))
        target_uri = write_task_jsonl(target, root / "target_examples.jsonl")
        remote_adapt: Any = ray.remote(num_cpus=1, max_retries=0)(adapt)
        refs = {
            init: remote_adapt.options(name=f"demo_adapt[{init}]").remote(
                target, str(root / "adapters" / init), adapt_config(init, plan, root), report.pool
            )
            for init in ("twist", "scratch")
        }
        with console.status("fine-tuning a twist and a scratch LoRA at once …"):
            results = dict(zip(refs, ray.get(list(refs.values())), strict=True))
        console.print(_adapt_table(results))
        details["adapt"] = {
            init: {k: r.metrics.get(k) for k in ("init_s", "train_s", "total_s")}
            for init, r in results.items()
        }

    with phase("evaluate", f"both adapters on {len(test.sources)} held-out {TARGET} examples"):
        with console.status("fitting the style classifier, restyling the test set …"):
            corpus = style_corpus(plan.classifier_texts, seed=303)
            classifier = StyleClassifier.fit([t for t, _ in corpus], [y for _, y in corpus])
            rows = []
            for init, result in results.items():
                ev = evaluate_adapter(
                    result.adapter_dir, test, TARGET, classifier, out=str(root / "eval" / init)
                )
                rows.append(
                    {
                        "init": init,
                        "n_train": plan.target_examples,
                        "n_test": ev.n,
                        "acc": ev.acc,
                        "acc_rule": ev.acc_rule,
                        "bleu": ev.bleu,
                        "g": ev.g,
                        "classifier_heldout_acc": ev.classifier_heldout_acc,
                    }
                )
        eval_table = root / "eval" / EVAL_TABLE
        eval_table.write_text(json.dumps(rows, indent=2))
        console.print(_eval_table(rows))
        console.print(f"style classifier held-out accuracy: {classifier.heldout_accuracy:.1f} %")

    with phase("serve", "the Serve app over HTTP: adapted and instance modes"):
        served = _serve_round_trip(
            report.pool, results["twist"].adapter_dir, target_uri, root / "served.json", console
        )

    with phase("restyle", f"{plan.corpus_rows} sentences in bulk with Ray Data"):
        corpus_uri = _write_jsonl(
            root / "corpus.jsonl",
            [{"id": i, "text": s} for i, s in enumerate(neutral_sentences(plan.corpus_rows, 404))],
        )
        restyled = root / "restyled"
        summary = restyle_in_bulk(corpus_uri, str(restyled), results["twist"].adapter_dir)
        console.print(
            f"restyled {summary['rows_written']} of {summary['rows_in']} rows "
            f"({summary['rows_skipped_existing']} done by an earlier run, "
            f"{summary['errors']} errors) in {summary['seconds']:.0f} s"
        )

    artefacts = {
        "base model": base_model,
        "pool": report.pool,
        "twist adapter": results["twist"].adapter_dir,
        "scratch adapter": results["scratch"].adapter_dir,
        "target examples": target_uri,
        "evaluation table": str(eval_table),
        "twist evaluation": str(root / "eval" / "twist"),
        "scratch evaluation": str(root / "eval" / "scratch"),
        "served responses": str(root / "served.json"),
        "bulk input": corpus_uri,
        "restyled corpus (Parquet)": str(restyled),
        "training runs (checkpoints)": str(root / "train"),
        "demo log": str(root / "demo.log"),
        "Ray logs": _ray_logs_dir(),
        "demo record": str(root / MANIFEST),
    }
    record = {
        "quick": quick,
        "plan": {**asdict(plan), "backbone": plan.backbone.model_dump()},
        "artefacts": artefacts,
        "phases": phase.seconds,
        "phase_details": details,
        "eval": rows,
        "served": served,
        "restyle": summary,
    }
    (root / MANIFEST).write_text(json.dumps(record, indent=2))

    console.rule(f"done in {sum(phase.seconds.values()):.0f} s")
    where = Table("artefact", "where")
    for name, path in artefacts.items():
        where.add_row(name, path)
    console.print(where)
    for name, seconds in phase.seconds.items():
        inside = ", ".join(f"{k} {_num(v)}" for k, v in _flat(details.get(name, {})).items())
        console.print(f"  {name:<11} {seconds:7.1f} s" + (f"  ({inside})" if inside else ""))
    console.save_text(str(root / "demo.log"))
    return record


def restyle_in_bulk(input_uri: str, output_uri: str, adapter: str) -> dict[str, Any]:
    """Adapted-mode bulk restyling with one actor; the job records its own summary."""
    from ray_twist.restyle import restyle_corpus

    return restyle_corpus(
        input_uri,
        output_uri,
        adapter=adapter,
        style=TARGET,
        batch_size=32,
        max_new_tokens=48,
        rows_per_part=64,
    )


def _adapt_table(results: dict[str, Any]) -> Table:
    table = Table("init", "steps", "loss (first → last)", "train s", "retrieval (top 3)")
    for init, result in results.items():
        m = result.metrics
        top = sorted((result.weights or {}).items(), key=lambda kv: -kv[1])[:3]
        table.add_row(
            init,
            str(m.get("steps", "-")),
            f"{m.get('first_loss', float('nan')):.3f} → {m.get('loss', float('nan')):.3f}",
            f"{m.get('train_s', float('nan')):.0f}",
            ", ".join(f"{k} {v:.2f}" for k, v in top) or "-",
        )
    return table


def _eval_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("init", "ACC (classifier) %", "ACC (rules) %", "BLEU", "G", title=TARGET)
    for row in rows:
        table.add_row(row["init"], *(_num(row[k]) for k in ("acc", "acc_rule", "bleu", "g")))
    return table


def _flat(details: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"twist": {"train_s": 3}} → {"twist train_s": 3}."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key} ")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _ray_logs_dir() -> str:
    """Where the latest local Ray session keeps its workers' and Serve's logs (Ray's documented
    default place; Ray has no public API for the running session's directory)."""
    return "/tmp/ray/session_latest/logs"


def _serve_round_trip(
    pool: str,
    adapter: str,
    examples: str,
    out: Path,
    console: Console,
    texts: list[str] | None = None,
    style: str = TARGET,
    modes: tuple[str, ...] = MODES,
) -> dict[str, Any]:
    """Deploy the app, restyle a few sentences in each mode over HTTP, shut Serve down."""
    from ray import serve

    from ray_twist.data import neutral_sentences
    from ray_twist.serve import ServeConfig, run

    config = ServeConfig.model_validate(
        {
            "pool": pool,
            "styles": {style: {"adapter": adapter, "examples": examples}},
            # a sharp retrieval: each sentence takes its nearest sources' style, zero-shot
            "retrieval": {"tau": 0.02},
            "http": {"port": _free_port()},
            "generator": {"num_replicas": 1},
            "ingress": {"num_replicas": 1},
        }
    )
    texts = texts or neutral_sentences(3, seed=505)
    try:
        with console.status("starting Serve …"):
            url = run(config)
        console.print(f"serving on {url} (API docs: {url}/docs)")
        answers = {
            mode: _post(
                f"{url}/v1/restyle",
                {"texts": texts, "style": style, "mode": mode, "max_new_tokens": 64},
            )
            for mode in modes
        }
    finally:
        serve.shutdown()
    table = Table("mode", "input", "output", "retrieval (top 2)")
    for mode, answer in answers.items():
        retrieval = answer.get("retrieval") or [None] * len(texts)
        for text, output, weights in zip(texts, answer["outputs"], retrieval, strict=True):
            table.add_row(mode, text, output, _top(weights))
    console.print(table)
    record = {"url": url, "texts": texts, **answers}
    out.write_text(json.dumps(record, indent=2))
    return record


def _top(weights: Any) -> str:
    if not isinstance(weights, dict) or not weights:
        return "-"
    top = sorted(weights.items(), key=lambda kv: -float(kv[1]))[:2]
    return ", ".join(f"{k} {float(v):.2f}" for k, v in top)
