"""The layers of `ray_twist`, bottom-up: a module imports only from its own layer or below.

Every import counts, wherever it stands: module level, inside a function (lazy imports),
under `if TYPE_CHECKING:`. The README's "Architecture" section draws the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (layer, the modules and packages in it), bottom first. A module belongs to the longest
#: prefix listed; every module of ray_twist must belong to one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("io", ("ray_twist", "ray_twist.storage", "ray_twist.settings", "ray_twist.vectors")),
    (
        "data, models",
        ("ray_twist.data", "ray_twist.backbone", "ray_twist.features", "ray_twist.generation"),
    ),  # fmt: skip
    ("lora", ("ray_twist.lora",)),
    ("core math", ("ray_twist.retrieval", "ray_twist.merge", "ray_twist.metrics")),
    ("pool", ("ray_twist.pool",)),
    ("train", ("ray_twist.train",)),
    (
        "pipelines",
        (
            "ray_twist.base",
            "ray_twist.build",
            "ray_twist.initialise",
            "ray_twist.styler",
            "ray_twist.adapt",
            "ray_twist.restyle",
        ),
    ),  # fmt: skip
    ("serve, evaluate", ("ray_twist.serve", "ray_twist.evaluate")),
    ("recipes", ("ray_twist.recipes",)),
    ("cli, jobs", ("ray_twist.cli", "jobs")),
]


def layer_of(module: str) -> int | None:
    """Index of the layer of `module` (longest listed prefix), None when outside ray_twist."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), index)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ray_twist import in a file, lazy and type-only ones too.
    `from pkg import name` counts as `pkg.name` when that is a module, else `pkg`."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = _module_path(candidate) is not None
                found.append((node.lineno, candidate if is_module else base))
    return [(line, name) for line, name in found if name.split(".")[0] == "ray_twist"]


def _module_path(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def sources() -> list[Path]:
    return sorted([*(ROOT / "ray_twist").rglob("*.py"), *(ROOT / "jobs").glob("*.py")])


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = []
    for path in sources():
        own = layer_of(module_name(path))
        assert own is not None
        for line, target in imported_modules(path):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                upward.append(
                    f"{path.relative_to(ROOT)}:{line}: {module_name(path)} ({LAYERS[own][0]}) "
                    f"imports {target} ({LAYERS[theirs][0]})"
                )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n    from ray_twist.serve import app\n", "ray_twist.serve.app"),
        ("from ray_twist.train import train_lora\n", "ray_twist.train"),
        ("import ray_twist.recipes.demo as d\n", "ray_twist.recipes.demo"),
    ],
)
def test_the_check_sees_lazy_and_plain_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str
) -> None:
    """The checker itself: lazy imports count, and the import names its line."""
    path = ROOT / "ray_twist" / "storage.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert imported_modules(path) == [(source.count("\n", 0, source.index("ray_twist")) + 1,
                                       expected)]  # fmt: skip
