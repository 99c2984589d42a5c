"""The low-resource study: how much does a TWIST initialisation help with little target data?

`run_study(config)` (jobs/low_resource.py) on the synthetic style world:

1. **base model** — a tiny T5 over the world's own vocabulary, pre-trained to copy neutral
   sentences, so that LoRAs learn *styles* (a stand-in for a pretrained LM; cached), or any
   model given as `base_model`;
2. **pool** — one LoRA per source style (every style but the held-out target, whose family
   sibling stays in), trained and keyed by `build.build_pool` (Ray Train + DeepSpeed);
3. **judge** — a `StyleClassifier` on the world's style-labelled texts (its held-out accuracy
   is reported), plus the world's exact rule checker;
4. **sweep** — data fractions × initialisations × seeds, and TWIST ablations (λ, q, top-k)
   at one fraction, each run = `adapt.adapt` (Ray Train local mode inside the task) +
   generation + scoring, fanned out as parallel Ray tasks. Every finished run writes
   `runs/<run>.json` (its row and per-example scores); a re-run skips finished runs;
5. **report** — `results.parquet` + `results.json` (one row per run), `summary.md` (means ±
   std over seeds), `fig2_g_vs_fraction.png`, `fig4_g_vs_rank.png`, `fig5_style_umap.png`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_twist import storage
from ray_twist.config import (
    AdaptConfig,
    BuildPoolConfig,
    InitMethod,
    RetrievalSettings,
    StudyConfig,
    WorldBackboneSettings,
)
from ray_twist.data.synthetic import STYLES, apply_style, make_task, neutral_sentences, style_corpus
from ray_twist.data.task import Task
from ray_twist.evaluate.classifier import StyleClassifier, shared_featurizer
from ray_twist.evaluate.run import TestSet, evaluate_adapter

__all__ = ["RunSpec", "StudyResult", "build_world_backbone", "plan_runs", "run_study", "summarise"]

G_METRICS = {"g": "G (style classifier)", "g_rule": "G (rule checker)"}
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---------------------------------------------------------------- the world's base model


def _world_vocabulary(seed: int) -> list[str]:
    """WordPiece vocabulary covering every neutral and styled sentence the world produces."""
    from transformers import AutoTokenizer

    from ray_twist.backbone import packaged_minilm_path

    minilm = AutoTokenizer.from_pretrained(packaged_minilm_path())
    pieces: set[str] = set()
    for sentence in neutral_sentences(2000, seed=seed):
        for text in [sentence, *(apply_style(style, sentence) for style in STYLES)]:
            pieces.update(minilm.tokenize(text))
    return _SPECIAL_TOKENS + sorted(pieces)


def build_world_backbone(out_dir: str, spec: WorldBackboneSettings) -> str:
    """The synthetic world's base model at `out_dir` (built once; a finished dir is reused).

    A T5 with a ~200-token vocabulary, fully trained for `pretrain_steps` to copy neutral
    sentences: the copying is what a pretrained LM brings, the styles are left to LoRAs.
    """
    import torch
    from transformers import BertTokenizer, T5Config, T5ForConditionalGeneration

    from ray_twist.backbone import _prepare_tokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return str(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.txt").write_text("\n".join(_world_vocabulary(spec.seed)) + "\n")
    tokenizer = _prepare_tokenizer(BertTokenizer(str(tmp / "vocab.txt"), do_lower_case=True))
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=spec.d_model,
        d_ff=4 * spec.d_model,
        d_kv=max(spec.d_model // 4, 1),
        num_layers=spec.num_layers,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        **{"decoder_start_token_id": tokenizer.pad_token_id},  # not in T5Config's signature
    )
    torch.manual_seed(spec.seed)
    model = T5ForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    rng = random.Random(spec.seed)
    corpus = neutral_sentences(5000, seed=spec.seed + 1)
    model.train()
    for _ in range(spec.pretrain_steps):
        batch = rng.sample(corpus, spec.batch_size)
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
              labels=labels).loss.backward()  # fmt: skip
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunSpec:
    """One adaptation of the study: which sweep it serves and its settings."""

    sweep: str  # "main", "lambda", "rank" or "top_k"
    init: InitMethod
    fraction: float
    seed: int
    rank: int
    lam: float
    top_k: int | None

    @property
    def key(self) -> tuple[Any, ...]:
        """What the run computes (a run shared by two sweeps is run once)."""
        return (self.init, self.fraction, self.seed, self.rank, self.lam, self.top_k)

    @property
    def name(self) -> str:
        k = "all" if self.top_k is None else self.top_k
        return (f"{self.init}-f{self.fraction:g}-s{self.seed}-q{self.rank}-l{self.lam:g}-k{k}"
                .replace(".", "p"))  # fmt: skip


def plan_runs(config: StudyConfig) -> list[RunSpec]:
    """Main grid (fractions × inits × seeds) then TWIST ablations, without duplicates."""
    base = config.retrieval
    specs = [
        RunSpec("main", init, fraction, seed, config.rank, base.lam, base.top_k)
        for fraction in config.fractions
        for init in config.inits
        for seed in config.seeds
    ]
    ab = config.ablations
    if ab is not None:
        for seed in config.seeds:
            twist = RunSpec("lambda", "twist", ab.fraction, seed, config.rank, base.lam, base.top_k)
            specs += [dataclasses.replace(twist, lam=lam) for lam in ab.lambdas]
            specs += [dataclasses.replace(twist, sweep="rank", rank=q) for q in ab.ranks]
            specs += [dataclasses.replace(twist, sweep="top_k", top_k=k) for k in ab.top_ks]
    return specs


# ---------------------------------------------------------------- one run (a Ray task)


@dataclass
class _Context:
    """What every run shares (shipped once through the object store)."""

    out: str
    pool: str
    target: Task
    test: TestSet
    style: str
    classifier: StyleClassifier
    config: StudyConfig


def _run(spec: RunSpec, ctx: _Context) -> dict[str, Any]:
    """Adapt, restyle the test set and score it; write and return the run's row."""
    from ray_twist.adapt import adapt
    from ray_twist.generation import GenerationSettings

    cfg = ctx.config
    started = time.perf_counter()
    task = ctx.target.sample(fraction=spec.fraction, seed=spec.seed)
    adapt_config = AdaptConfig(
        init=spec.init,
        rank=spec.rank,
        retrieval=RetrievalSettings.model_validate(
            {"lambda": spec.lam, "tau": cfg.retrieval.tau, "top_k": spec.top_k}
        ),
        training=cfg.training.model_copy(update={"seed": spec.seed}),
        deepspeed=cfg.deepspeed,
        resources=cfg.resources,
        storage_path=storage.join(ctx.out, "train"),
    )
    result = adapt(task, storage.join(ctx.out, "adapters", spec.name), adapt_config, ctx.pool,
                   featurizer=shared_featurizer(cfg.featurizer))  # fmt: skip
    ev = cfg.evaluation
    settings = GenerationSettings(max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams)
    report = evaluate_adapter(result.adapter_dir, ctx.test, ctx.style, ctx.classifier,
                              generation=settings, batch_size=ev.batch_size)  # fmt: skip
    row = {
        **dataclasses.asdict(spec),
        "run": spec.name,
        "n_train": len(task),
        **{k: getattr(report, k) for k in ("acc", "acc_rule", "bleu", "g", "g_rule")},
        "classifier_heldout_acc": report.classifier_heldout_acc,
        **{k: result.metrics.get(k) for k in ("steps", "epochs", "best_val_loss", "train_s")},
        "weights": json.dumps(result.weights) if result.weights is not None else None,
        "seconds": time.perf_counter() - started,
    }
    record = {"row": row, "examples": [dataclasses.asdict(e) for e in report.examples]}
    storage.write_bytes(storage.join(ctx.out, "runs", f"{spec.name}.json"),
                        json.dumps(record).encode())  # fmt: skip
    return row


# ---------------------------------------------------------------- the driver


@dataclass
class StudyResult:
    """Where the study wrote its outputs, and its rows."""

    out: str
    rows: list[dict[str, Any]]
    summary: str
    figures: list[str]
    seconds: float


def _pool(config: StudyConfig, base_model: str, sources: list[str]) -> str:
    from ray_twist.build import build_pool

    uri = storage.join(config.out, "pool")
    build = BuildPoolConfig.model_validate(
        {
            "base_model": {"path": base_model},
            "lora": config.source_lora.model_dump(),
            "sources": [
                {
                    "synthetic": {
                        "styles": sources,
                        "n_per_style": config.world.n_source,
                        "seed": config.world.seed,
                    }
                }
            ],  # fmt: skip
            "training": config.source_training.model_dump(),
            "deepspeed": config.deepspeed.model_dump(),
            "resources": config.resources.model_dump(),
            "featurizer": {"model": config.featurizer},
            "pool": uri,
            "storage_path": storage.join(config.out, "sources"),
        }
    )
    build_pool(build, progress=False)
    return uri


def _done(out: str, spec: RunSpec) -> dict[str, Any] | None:
    uri = storage.join(out, "runs", f"{spec.name}.json")
    return json.loads(storage.read_bytes(uri))["row"] if storage.exists(uri) else None


def _execute(specs: Sequence[RunSpec], ctx: _Context) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Run every distinct spec not already done, as parallel Ray tasks."""
    import ray

    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    todo: dict[tuple[Any, ...], RunSpec] = {}
    for spec in specs:
        if spec.key in rows or spec.key in todo:
            continue
        done = _done(ctx.out, spec)
        if done is not None:
            rows[spec.key] = done
        else:
            todo[spec.key] = spec
    remote = ray.remote(num_cpus=ctx.config.cpus_per_run, max_retries=1)(_run)
    shared = ray.put(ctx)
    pending = {
        remote.options(name=f"study[{s.name}]").remote(s, shared): k for k, s in todo.items()
    }
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        rows[pending.pop(ready[0])] = ray.get(ready[0])
    return rows


def summarise(rows: Sequence[dict[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, std and count over seeds of each metric, per group of `by` columns."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(by, key, strict=True)) | {"n": len(members)}
        for metric in ("g", "g_rule", "acc", "acc_rule", "bleu"):
            values = [m[metric] for m in members if m.get(metric) is not None]
            entry[metric] = float(np.mean(values)) if values else None
            entry[f"{metric}_std"] = float(np.std(values)) if values else None
        out.append(entry)
    return out


def _table(stats: Sequence[dict[str, Any]], by: Sequence[str]) -> str:
    def cell(entry: dict[str, Any], metric: str) -> str:
        mean, std = entry[metric], entry[f"{metric}_std"]
        return "-" if mean is None else f"{mean:.1f} ± {std:.1f}"

    metrics = ("g", "g_rule", "acc", "acc_rule", "bleu")
    lines = ["| " + " | ".join([*by, "seeds", *metrics]) + " |",
             "|" + "---|" * (len(by) + 1 + len(metrics))]  # fmt: skip
    for entry in stats:
        keys = [str(entry[k]) for k in by]
        lines.append("| " + " | ".join([*keys, str(entry["n"]), *(cell(entry, m) for m in metrics)])
                     + " |")  # fmt: skip
    return "\n".join(lines)


def _sweep_rows(specs: Sequence[RunSpec], rows: dict[tuple[Any, ...], dict[str, Any]],
                sweep: str) -> list[dict[str, Any]]:  # fmt: skip
    return [{**rows[s.key], "sweep": sweep} for s in specs if s.sweep == sweep]


def _style_map(ctx: _Context, sources: list[str], rows: list[dict[str, Any]], path: str) -> str:
    """Figure 5: style features of source-style texts, references and generated outputs."""
    from ray_twist.evaluate.plots import plot_style_map

    n = ctx.config.evaluation.umap_texts_per_group
    texts, groups = [], []
    for style in sources:
        texts += make_task(style, n, seed=ctx.config.world.seed + 7).targets
        groups += [f"source: {style}"] * n
    assert ctx.test.targets is not None
    texts += ctx.test.targets[:n]
    groups += [f"reference: {ctx.style}"] * len(ctx.test.targets[:n])
    fraction = ctx.config.ablations.fraction if ctx.config.ablations else min(ctx.config.fractions)
    for init in ("scratch", "twist"):
        run = next((r for r in rows if r["init"] == init and r["fraction"] == fraction
                    and r["sweep"] == "main"), None)  # fmt: skip
        if run is None:
            continue
        examples = json.loads(
            storage.read_bytes(storage.join(ctx.out, "runs", f"{run['run']}.json"))
        )
        outputs = [e["output"] for e in examples["examples"][:n]]
        texts += outputs
        groups += [f"generated: {init} ({100 * fraction:g} %)"] * len(outputs)
    embeddings = shared_featurizer(ctx.config.featurizer).encode(texts)
    return plot_style_map(embeddings, groups, path, f"style features (UMAP), target {ctx.style}")


def run_study(config: StudyConfig) -> StudyResult:
    """The whole study (see the module docstring); uses the running Ray or starts one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from ray_twist.evaluate.plots import plot_vs_fraction, plot_vs_rank

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    world = config.world
    sources = world.sources or [s for s in STYLES if s != world.target]
    base_model = config.base_model or ray.get(  # a Ray task: one CPU, one torch thread
        ray.remote(num_cpus=1)(build_world_backbone).remote(
            str(Path(config.out, "base_model").absolute()), config.world_backbone
        )
    )
    pool = _pool(config, base_model, sources)
    everything = make_task(world.target, world.n_target + world.n_test, seed=world.seed + 1)
    target = everything.take(list(range(world.n_target)))
    test = TestSet.from_task(everything.take(list(range(world.n_target, len(everything)))))
    corpus = style_corpus(config.evaluation.classifier_texts_per_style, seed=world.seed)
    classifier = StyleClassifier.fit([t for t, _ in corpus], [label for _, label in corpus],
                                     config.featurizer, seed=world.seed)  # fmt: skip
    ctx = _Context(config.out, pool, target, test, world.target, classifier, config)

    specs = plan_runs(config)
    rows = _execute(specs, ctx)
    sweeps = dict.fromkeys(s.sweep for s in specs)
    table = [row for sweep in sweeps for row in _sweep_rows(specs, rows, sweep)]
    pq.write_table(pa.Table.from_pylist(table), storage.join(config.out, "results.parquet"))

    main = [r for r in table if r["sweep"] == "main"]
    sections = {
        "main": (main, ["fraction", "init"]),
        "lambda": ([r for r in table if r["sweep"] == "lambda"], ["lam"]),
        "rank": ([r for r in table if r["sweep"] == "rank"], ["rank"]),
        "top_k": ([r for r in table if r["sweep"] == "top_k"], ["top_k"]),
    }
    summary = [
        f"# Low-resource study: target {world.target!r}, sources {', '.join(sources)}",
        f"style classifier held-out accuracy: {classifier.heldout_accuracy:.1f} % "
        f"({classifier.n_heldout} texts, {len(classifier.classes)} labels)",
    ]
    stats_out: dict[str, Any] = {}
    for sweep, (sweep_rows, by) in sections.items():
        if sweep_rows:
            stats_out[sweep] = summarise(sweep_rows, by)
            summary += ["", f"## {sweep}", _table(stats_out[sweep], by)]
    figures = [plot_vs_fraction(main, str(Path(config.out, "fig2_g_vs_fraction.png")), G_METRICS,
                                f"target {world.target}: G vs data, mean ± std over seeds")]  # fmt: skip
    if sections["rank"][0]:
        figures.append(plot_vs_rank(sections["rank"][0], str(Path(config.out, "fig4_g_vs_rank.png")),
                                    G_METRICS, "TWIST init: G vs q"))  # fmt: skip
    figures.append(_style_map(ctx, sources, table, str(Path(config.out, "fig5_style_umap.png"))))
    text = "\n".join(summary) + "\n"
    storage.write_bytes(storage.join(config.out, "summary.md"), text.encode())
    seconds = time.perf_counter() - started
    record = {"config": config.model_dump(mode="json", by_alias=True), "rows": table,
              "summary": stats_out, "seconds": seconds,
              "classifier": dataclasses.asdict(classifier) | {"coef": None}}  # fmt: skip
    storage.write_bytes(
        storage.join(config.out, "results.json"), json.dumps(record, indent=1).encode()
    )
    return StudyResult(config.out, table, text, figures, seconds)
