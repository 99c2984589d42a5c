"""What a pool build reports: per-source outcomes, and the end-of-build summary table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rich.table import Table

__all__ = ["BuildPoolError", "BuildReport", "SourceOutcome", "summary_table"]

Status = Literal["trained", "skipped", "failed"]


@dataclass
class SourceOutcome:
    """What a build did with one configured source."""

    name: str
    status: Status
    run: str
    metrics: dict[str, Any] = field(default_factory=dict)
    cluster: int | None = None
    error: str | None = None


@dataclass
class BuildReport:
    """A build's result: per-source outcomes, the pool generation it left, phase timings."""

    pool: str
    generation: int | None
    committed: bool
    seconds: float
    sources: dict[str, SourceOutcome]
    phases: dict[str, float] = field(default_factory=dict)

    def _with(self, status: Status) -> list[str]:
        return [n for n, o in self.sources.items() if o.status == status]

    @property
    def trained(self) -> list[str]:
        return self._with("trained")

    @property
    def skipped(self) -> list[str]:
        return self._with("skipped")

    @property
    def failed(self) -> list[str]:
        return self._with("failed")


class BuildPoolError(RuntimeError):
    """Some sources failed to train; the others are committed and in `report`."""

    def __init__(self, report: BuildReport) -> None:
        self.report = report
        errors = "; ".join(f"{n}: {report.sources[n].error}" for n in report.failed)
        super().__init__(f"{len(report.failed)} sources failed to train ({errors})")


def _number(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary_table(report: BuildReport) -> Table:
    """The end-of-build table: one row per source (metrics of skipped ones from the pool),
    the failed sources' errors below it."""
    state = "committed" if report.committed else "unchanged"
    pool = "no pool yet" if report.generation is None else f"generation {report.generation}"
    table = Table(
        title=(
            f"pool {report.pool}: {pool} ({state}); {len(report.trained)} trained, "
            f"{len(report.skipped)} skipped, {len(report.failed)} failed in {report.seconds:.0f} s"
        ),
        caption="\n".join(f"{n}: {report.sources[n].error}" for n in report.failed) or None,
    )
    numbers = {"steps", "samples/s", "train s"}
    for column in ("source", "status", "cluster", "steps", "loss", "samples/s", "train s", "run"):
        table.add_column(column, justify="right" if column in numbers else "left")
    colour = {"trained": "green", "skipped": "dim", "failed": "red"}
    for outcome in report.sources.values():
        m = outcome.metrics
        loss = f"{_number(m.get('first_loss'), '.3f')} → {_number(m.get('loss'), '.3f')}"
        table.add_row(
            outcome.name,
            f"[{colour[outcome.status]}]{outcome.status}[/]",
            _number(outcome.cluster, "d"),
            _number(m.get("steps"), "d"),
            loss if "loss" in m else "-",
            _number(m.get("samples_per_s"), ".1f"),
            _number(m.get("train_s"), ".1f"),
            outcome.run,
        )
    return table
