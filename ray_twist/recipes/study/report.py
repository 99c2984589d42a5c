"""The study's tables and figures: means ± std over seeds, G curves, the style map."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_twist import storage
from ray_twist.evaluate.classifier import shared_featurizer
from ray_twist.merge import DEFAULT_MERGE_ORDER
from ray_twist.recipes.study.runs import Context

__all__ = ["G_METRICS", "paired_table", "report", "summarise"]

G_METRICS = {"g": "G (style classifier)", "g_rule": "G (rule checker)"}
# train_loss: mean over the run's steps (the same batches for every init of a seed)
METRICS = ("g", "g_rule", "acc", "acc_rule", "bleu", "train_loss")


def summarise(rows: Sequence[dict[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, std and count over seeds of each metric, per group of `by` columns."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(by, key, strict=True)) | {"n": len(members)}
        for metric in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            entry[metric] = float(np.mean(values)) if values else None
            entry[f"{metric}_std"] = float(np.std(values)) if values else None
        out.append(entry)
    return out


def _table(stats: Sequence[dict[str, Any]], by: Sequence[str]) -> str:
    def cell(entry: dict[str, Any], metric: str) -> str:
        mean, std = entry[metric], entry[f"{metric}_std"]
        digits = 3 if metric == "train_loss" else 1
        return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [
        "| " + " | ".join([*by, "seeds", *METRICS]) + " |",
        "|" + "---|" * (len(by) + 1 + len(METRICS)),
    ]
    for entry in stats:
        keys = [str(entry[k]) for k in by]
        lines.append(
            "| " + " | ".join([*keys, str(entry["n"]), *(cell(entry, m) for m in METRICS)]) + " |"
        )
    return "\n".join(lines)


def paired_table(
    rows: Sequence[dict[str, Any]], ours: str = "twist", other: str = "uniform"
) -> str:
    """`ours` minus `other` run by run (same fraction and seed, so the same training batches):
    mean differences and how many pairs favour `ours`. Pairing removes the seed-to-seed
    spread that hides small differences in the mean ± std table."""
    by_run = {(r["init"], r["fraction"], r["seed"]): r for r in rows}
    pairs_by_fraction: dict[float, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for (init, fraction, seed), row in sorted(by_run.items()):
        if init == ours and (other, fraction, seed) in by_run:
            pairs_by_fraction.setdefault(fraction, []).append((row, by_run[other, fraction, seed]))
    lines = [
        f"| fraction | pairs | Δ G | {ours} G higher | Δ train loss | {ours} loss lower |",
        "|---|---|---|---|---|---|",
    ]
    for fraction, pairs in pairs_by_fraction.items():
        dg = [a["g"] - b["g"] for a, b in pairs]
        dl = [a["train_loss"] - b["train_loss"] for a, b in pairs]
        lines.append(
            f"| {fraction:g} | {len(pairs)} | {np.mean(dg):+.2f} | {sum(d > 0 for d in dg)} | "
            f"{np.mean(dl):+.3f} | {sum(d < 0 for d in dl)} |"
        )
    return "\n".join(lines)


def _style_map(ctx: Context, sources: list[str], rows: list[dict[str, Any]], path: str) -> str:
    """Figure 5: style features of source-style texts, references and generated outputs.

    A text's style feature is its embedding minus its input's (both unit-norm): raw sentence
    embeddings cluster by content, which every style here shares; the shift keeps the style.
    """
    from ray_twist.evaluate.plots import plot_style_map

    n = ctx.config.evaluation.umap_texts_per_group
    pairs: list[tuple[str, str]] = []  # (input, text)
    groups: list[str] = []
    for style, examples in ctx.source_examples.items():
        pairs += examples[:n]
        groups += [f"source: {style}"] * len(examples[:n])
    assert ctx.test.targets is not None
    pairs += list(zip(ctx.test.sources, ctx.test.targets, strict=True))[:n]
    groups += [f"reference: {ctx.style}"] * (len(pairs) - len(groups))
    fraction = ctx.config.ablations.fraction if ctx.config.ablations else min(ctx.config.fractions)
    for init in ("scratch", "twist"):
        run = next(
            (
                r
                for r in rows
                if r["init"] == init and r["fraction"] == fraction and r["sweep"] == "main"
            ),
            None,
        )
        if run is not None:
            record = json.loads(
                storage.read_bytes(storage.join(ctx.out, "runs", f"{run['run']}.json"))
            )
            pairs += [(e["source"], e["output"]) for e in record["examples"][:n]]
            groups += [f"generated: {init} ({100 * fraction:g} %)"] * (len(pairs) - len(groups))
    featurizer = shared_featurizer(ctx.config.featurizer)
    shift = featurizer.encode([t for _, t in pairs]) - featurizer.encode([x for x, _ in pairs])
    title = f"style features (output − input embedding, UMAP), target {ctx.style}"
    return plot_style_map(shift, groups, path, title)


def _baseline_table(baselines: Sequence[dict[str, Any]], swept: list[dict[str, Any]]) -> str:
    """The identity output and the full-data LoRA, in the main table's columns."""
    lines = ["| baseline | seeds | g | acc | bleu |", "|---|---|---|---|---|"]
    rows = [*baselines, *swept]
    for row in rows:
        cells = [f"{row[m]:.1f}" if row.get(m) is not None else "-" for m in ("g", "acc", "bleu")]
        name = row["init"] if row["sweep"] == "baseline" else f"full-data LoRA ({row['run']})"
        lines.append(f"| {name} | 1 | {' | '.join(cells)} |")
    return "\n".join(lines)


def _weights_table(table: Sequence[dict[str, Any]], sources: list[str]) -> str:
    """TWIST's retrieval weights per source, mean over seeds, for each setting that ran: where
    retrieval put the pool's mass is the first thing to check when TWIST does not win."""
    groups: dict[tuple[Any, ...], list[dict[str, float]]] = {}
    for row in table:
        if row["init"] == "twist" and row.get("weights"):
            setting = (row["sweep"], row["fraction"], row["lam"], row["tau"], row["top_k"],
                       row.get("merge_order", DEFAULT_MERGE_ORDER))  # fmt: skip
            groups.setdefault(setting, []).append(json.loads(row["weights"]))
    lines = [
        "| sweep | fraction | λ | τ | top-k | merge order | seeds | " + " | ".join(sources) + " |",
        "|" + "---|" * (7 + len(sources)),
    ]
    for (sweep, fraction, lam, tau, top_k, order), runs in groups.items():
        means = [float(np.mean([w.get(s, 0.0) for w in runs])) for s in sources]
        lines.append(
            f"| {sweep} | {100 * fraction:g} % | {lam} | {tau} | {top_k} | {order} | {len(runs)} | "
            + " | ".join(f"{m:.2f}" for m in means)
            + " |"
        )
    return "\n".join(lines)


def _samples(ctx: Context, table: Sequence[dict[str, Any]], n: int = 5) -> str:
    """n test inputs with their reference and each init's output (seed 0, lowest fraction)."""
    fraction = min(r["fraction"] for r in table if r["sweep"] == "main")
    runs = {
        r["init"]: r["run"]
        for r in table
        if r["sweep"] == "main" and r["fraction"] == fraction and r["seed"] == min(ctx.config.seeds)
    }
    outputs = {
        init: json.loads(storage.read_bytes(storage.join(ctx.out, "runs", f"{run}.json")))[
            "examples"
        ]
        for init, run in runs.items()
    }
    lines = [f"## Samples ({100 * fraction:g} % of the target data, seed {min(ctx.config.seeds)})"]
    refs = ctx.test.targets or [""] * len(ctx.test.sources)
    for i, (source, reference) in enumerate(list(zip(ctx.test.sources, refs, strict=True))[:n]):
        lines += ["", f"**{i + 1}.** input: {source}", f"- reference: {reference}"]
        lines += [f"- {init}: {examples[i]['output']}" for init, examples in outputs.items()]
    return "\n".join(lines)


def report(
    ctx: Context,
    sources: list[str],
    table: list[dict[str, Any]],
    baselines: Sequence[dict[str, Any]] = (),
) -> tuple[str, list[str], dict[str, Any]]:
    """summary.md text, the figures, and the per-sweep statistics."""
    from ray_twist.evaluate.plots import plot_vs_fraction, plot_vs_rank

    out, target, clf = ctx.out, ctx.style, ctx.classifier
    by = {
        "main": ["fraction", "init"],
        "lambda": ["lam"],
        "tau": ["tau"],
        "rank": ["rank"],
        "top_k": ["top_k"],
        "merge_order": ["merge_order"],
        "full-data": ["init"],
    }
    swept = {name: [r for r in table if r["sweep"] == name] for name in by}
    stats = {name: summarise(rows, by[name]) for name, rows in swept.items() if rows}
    lines = [
        f"# Low-resource study: target {target!r}, sources {', '.join(sources)}",
        f"style classifier held-out accuracy: {clf.heldout_accuracy:.1f} % "
        f"({clf.n_heldout} texts, {len(clf.classes)} labels)",
    ]
    for name, entries in stats.items():
        if name != "full-data":
            lines += ["", f"## {name}", _table(entries, by[name])]
        if name == "main" and {"twist", "uniform"} <= {r["init"] for r in swept["main"]}:
            lines += ["", "## twist vs uniform, paired by seed", paired_table(swept["main"])]
    if baselines or swept["full-data"]:
        lines += ["", "## baselines", _baseline_table(baselines, swept["full-data"])]
    if any(r["init"] == "twist" and r.get("weights") for r in table):
        lines += ["", "## retrieval weights (TWIST)", _weights_table(table, sources)]
    lines += ["", _samples(ctx, table)]
    figures = [
        plot_vs_fraction(
            swept["main"],
            str(Path(out, "fig2_g_vs_fraction.png")),
            G_METRICS,
            f"target {target}: G vs data, mean ± std over seeds",
        )
    ]
    if swept["rank"]:
        figures.append(
            plot_vs_rank(
                swept["rank"],
                str(Path(out, "fig4_g_vs_rank.png")),
                G_METRICS,
                f"target {target}: G vs q (TWIST init)",
            )
        )
    figures.append(_style_map(ctx, sources, table, str(Path(out, "fig5_style_umap.png"))))
    return "\n".join(lines) + "\n", figures, stats
