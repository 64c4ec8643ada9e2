"""Content hashes of the code each pipeline stage runs.

A stage's code is its entry modules and everything they import from the
package, found by reading the modules' import statements (function-level
imports included), so the list never goes stale. For training, the entry
modules are the loop plus what the registry names for the method (its inputs,
item encoder, user encoder), which the loop only reaches through the registry.

The Snakefile passes these hashes as rule params, so editing a module reruns
exactly the stages that use it; extraction also stores its hash in the cache so a
rerun rebuilds the store instead of "resuming" chunks made by older code.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

_PKG = Path(__file__).resolve().parent
STAGES = {
    "prepare": ("iisan.data", "iisan.synth"),
    "backbones": ("iisan.tiny",),
    "caption": ("iisan.caption",),
    "extract": ("iisan.extract",),
    "train": ("iisan.train",),
    "aggregate": ("iisan.aggregate",),
    "profile": ("iisan.profiling",),
    "recommend": ("iisan.recommend",),
    "report": ("iisan.report",),
}


@functools.cache
def _imports(module: str) -> frozenset[str]:
    """iisan modules that ``module`` imports anywhere in its source."""
    tree = ast.parse((_PKG / f"{module.split('.', 1)[1]}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("iisan."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "iisan":  # from iisan import x, y: submodules (or the package's __init__)
                found.update(f"iisan.{a.name}" for a in node.names if (_PKG / f"{a.name}.py").is_file())
            elif node.module.startswith("iisan."):
                found.add(node.module)
    # this module hashes code; it does not change what a stage computes
    return frozenset(found - {__name__})


def closure(entries) -> list[str]:
    """``entries`` and every iisan module they import, transitively; sorted."""
    seen, todo = set(), list(entries)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_imports(m))
    return sorted(seen)


def stage_modules(stage: str, method: str | None = None) -> list[str]:
    """The modules a stage runs (``method``: a training run's method)."""
    entries = list(STAGES[stage])
    if method is not None:
        from iisan.methods import get

        entries += get(method).modules
    return closure(entries)


def code_hash(stage: str, method: str | None = None) -> str:
    h = hashlib.sha256()
    for module in stage_modules(stage, method):
        name = module.split(".", 1)[1] + ".py"
        h.update(name.encode())
        h.update((_PKG / name).read_bytes())
    return h.hexdigest()[:16]
