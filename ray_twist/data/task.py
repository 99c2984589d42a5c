"""One style task: parallel (source → target) text pairs with a name and a split."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    """A style-transfer task. `sources[i]` is rewritten as `targets[i]`.

    `references` optionally holds extra reference rewrites per example (evaluation only).
    """

    name: str
    sources: list[str]
    targets: list[str]
    split: str = "train"
    references: list[list[str]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.targets):
            raise ValueError(
                f"task {self.name!r}: {len(self.sources)} sources but {len(self.targets)} targets"
            )

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.sources, self.targets, strict=True))

    def take(self, indices: list[int], split: str | None = None) -> Task:
        return Task(
            name=self.name,
            sources=[self.sources[i] for i in indices],
            targets=[self.targets[i] for i in indices],
            split=split or self.split,
        )

    def sample(self, fraction: float | None = None, n: int | None = None, seed: int = 0) -> Task:
        """A seeded subset by fraction or count (at least one example)."""
        size = n if n is not None else max(1, round(len(self) * (fraction or 1.0)))
        idx = sorted(random.Random(seed).sample(range(len(self)), min(size, len(self))))
        return self.take(idx)

    def split_off(self, fraction: float, seed: int = 0) -> tuple[Task, Task]:
        """(train, validation) with `fraction` of examples (≥1 when there are ≥2) held out."""
        idx = list(range(len(self)))
        random.Random(seed).shuffle(idx)
        n_val = min(len(self) - 1, max(1, round(len(self) * fraction))) if len(self) > 1 else 0
        return self.take(sorted(idx[n_val:]), "train"), self.take(sorted(idx[:n_val]), "validation")

    def content_hash(self) -> str:
        """sha256 of the pairs: pool builds retrain a source only when this changes."""
        blob = json.dumps([self.sources, self.targets], ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()
