"""The layering docs/architecture.md promises, read from the source: what each part may import.

Every ``import`` of a module counts, also one inside a function (a lazy import is still a
dependency), except those under ``if TYPE_CHECKING:`` (annotations only). A new module falls under
the rule of its part (its folder or its name below); a module no rule names fails the last test,
so the table stays complete.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bnprobe"

LIGHTNING = ("pytorch_lightning", "lightning")
SINKS = ("bnprobe.recorder", "bnprobe.tensorboard", "bnprobe.figures")
DRIVERS = ("bnprobe.callback", "bnprobe.lightning", "bnprobe.loop", "bnprobe.cli")

# part -> modules it may not import (a prefix forbids the package and everything under it)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "bnprobe.metrics": ("bnprobe", "torch", "numpy", "pandas", *LIGHTNING),
    "bnprobe.stats": ("bnprobe.store", "bnprobe.tap", *SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.store": ("torch", "bnprobe.tap", "bnprobe.diagnosis", *SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.tap": ("bnprobe.diagnosis", "tensorboard", *SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.passes": ("pandas", "bnprobe.store", *SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.mismatch": (*SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.recalibration": (*SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.distributed": (*SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.diagnosis": ("torch", "bnprobe.tap", *SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.tensorboard": ("bnprobe.tap", "bnprobe.recorder", *DRIVERS, *LIGHTNING),
    "bnprobe.figures": ("torch", "bnprobe.tap", "bnprobe.recorder", *DRIVERS, *LIGHTNING),
    "bnprobe.recorder": ("bnprobe.tap", *DRIVERS, *LIGHTNING),
    "bnprobe.drive": ("bnprobe.recorder", *SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.options": ("torch", *SINKS, *DRIVERS, *LIGHTNING),
    "bnprobe.loop": ("bnprobe.callback", "bnprobe.lightning", *LIGHTNING),
    # the drivers and demos of Lightning: the only parts that may import it
    "bnprobe.callback": ("bnprobe.loop", "bnprobe.cli"),
    "bnprobe.lightning": ("bnprobe.loop", "bnprobe.cli"),
    "bnprobe.cli": (),
    "bnprobe.demo": ("bnprobe.cli",),
    "bnprobe.pathologies": ("bnprobe.cli",),
    "bnprobe": (),  # __init__ (lazy re-exports) and __main__
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts)


def _part(module: str) -> str | None:
    """The longest key of FORBIDDEN that ``module`` is or lies under."""
    hits = [k for k in FORBIDDEN if module == k or module.startswith(k + ".")]
    return max(hits, key=len) if hits else None


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    package = _module_name(path)
    package = package if path.name == "__init__.py" else package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
    return found


def _forbids(rule: str, name: str) -> bool:
    return name == rule or name.startswith(rule + ".")


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_each_module_imports_only_what_its_part_may(path: Path) -> None:
    module = _module_name(path)
    part = _part(module)
    assert part is not None, f"{module} belongs to no part: add it to FORBIDDEN and the docs"
    own = ("bnprobe",) if part == "bnprobe.metrics" else ()
    bad = sorted(
        name
        for name in _imports(path)
        for rule in FORBIDDEN[part]
        if _forbids(rule, name) and not (rule in own and _forbids(module, name))
    )
    assert not bad, f"{module} ({part}) may not import {bad} (docs/architecture.md)"


def test_the_core_runs_without_lightning_being_imported() -> None:
    """The plain-loop path, end to end, in a fresh interpreter: Lightning never loads."""
    code = (
        "import sys, torch, bnprobe\n"
        "from bnprobe import recorder, loop, tap, store, stats, metrics, mismatch, recalibration\n"
        "from bnprobe import diagnosis, tensorboard, distributed, passes, drive, options\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))\n"
        "with tap.BNTap(m) as t:\n"
        "    t.start(); m(torch.randn(8, 3)); rows = t.collect(step=0).rows\n"
        "print(len(rows) > 0, [k for k in sys.modules if k.split('.')[0] in "
        "('pytorch_lightning', 'lightning')])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["True", "[]"]
