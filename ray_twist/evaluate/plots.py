"""The study's figures (PNG, matplotlib's Agg backend, so they render on headless workers).

- `plot_vs_fraction`: G-score against the share of target data, one line per
  initialisation, mean ± standard deviation over seeds (the TWIST paper's Figure 2);
- `plot_vs_rank`: G-score against the kept rank q (Figure 4);
- `plot_style_map`: a 2-D UMAP of style features of source, reference and generated texts
  (Figure 5).

Each takes plain rows (dicts), so it plots any results table with the named columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_style_map", "plot_vs_fraction", "plot_vs_rank"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_std(
    rows: Sequence[dict[str, Any]], key: str, x: str
) -> tuple[list[Any], list[float], list[float]]:
    xs = sorted({row[x] for row in rows if row.get(key) is not None})
    values = [[row[key] for row in rows if row[x] == v and row.get(key) is not None] for v in xs]
    return xs, [float(np.mean(v)) for v in values], [float(np.std(v)) for v in values]


_STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-")]


def _lines(ax: Any, rows: Sequence[dict[str, Any]], key: str, x: str, by: str) -> None:
    """A line per group; markers and dashes differ, so coinciding lines stay visible."""
    for i, group in enumerate(dict.fromkeys(row[by] for row in rows)):
        xs, mean, std = _mean_std([r for r in rows if r[by] == group], key, x)
        marker, dash = _STYLES[i % len(_STYLES)]
        if xs:
            ax.errorbar(
                xs, mean, yerr=std, marker=marker, linestyle=dash, capsize=3, label=str(group)
            )


def _curves(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    metrics: dict[str, str],
    title: str,
    x: str,
    xlabel: str,
    log_base: float,
) -> str:
    """One panel per metric (column → panel title): mean ± std of it vs `x`, a line per init.
    A metric no row has (the rule checker on real text) gets no panel."""
    metrics = {k: v for k, v in metrics.items() if any(r.get(k) is not None for r in rows)}
    if not metrics:
        raise ValueError(
            f"no row has any of the metrics to plot; rows have {sorted(rows[0]) if rows else []}"
        )
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, (key, panel) in zip(axes[0], metrics.items(), strict=True):
        _lines(ax, rows, key, x, "init")
        ax.set_xscale("log", base=log_base)
        ax.set_xticks(sorted({r[x] for r in rows}))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.set(xlabel=xlabel, ylabel="G-score", title=panel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_vs_fraction(
    rows: Sequence[dict[str, Any]], path: str | Path, metrics: dict[str, str], title: str
) -> str:
    """G vs % of the target data used (rows need `fraction`, `init` and the metrics)."""
    shown = [{**r, "percent": 100.0 * r["fraction"]} for r in rows]
    return _curves(shown, path, metrics, title, "percent", "target data used (%)", 10)


def plot_vs_rank(
    rows: Sequence[dict[str, Any]], path: str | Path, metrics: dict[str, str], title: str
) -> str:
    """G vs the kept rank q (rows need `rank`, `init` and the metrics)."""
    return _curves(rows, path, metrics, title, "rank", "rank q of the target LoRA", 2)


def plot_style_map(
    embeddings: np.ndarray, groups: Sequence[str], path: str | Path, title: str, seed: int = 0
) -> str:
    """2-D UMAP of style features, coloured by group (e.g. source style, reference, output)."""
    import umap

    if len(embeddings) != len(groups):
        raise ValueError(f"{len(embeddings)} embeddings but {len(groups)} group labels")
    points = umap.UMAP(n_components=2, random_state=seed, metric="cosine").fit_transform(embeddings)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    labels = np.asarray(groups)
    for group in dict.fromkeys(groups):
        mine = points[labels == group]
        ax.scatter(mine[:, 0], mine[:, 1], s=10, alpha=0.7, label=group)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
