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

_PKG = Path(__file__).resolve().parents[1]  # the iisan package folder
STAGES = {
    "prepare": ("iisan.data.prepare", "iisan.data.synth"),
    "backbones": ("iisan.extract.tiny",),
    "caption": ("iisan.extract.caption",),
    "extract": ("iisan.extract.extraction",),
    "train": ("iisan.train.loop",),
    "aggregate": ("iisan.results.aggregate",),
    "profile": ("iisan.train.profiling",),
    "recommend": ("iisan.use.recommend",),
    "report": ("iisan.results.report",),
}


def module_file(module: str) -> Path | None:
    """The source file of an iisan module or package (None if there is none)."""
    parts = module.split(".")[1:]
    for path in ([_PKG.joinpath(*parts[:-1], f"{parts[-1]}.py")] if parts else []) + [
        _PKG.joinpath(*parts, "__init__.py")
    ]:
        if path.is_file():
            return path
    return None


def modules() -> list[str]:
    """Every module of the package, by dotted name."""
    found = []
    for path in sorted(_PKG.rglob("*.py")):
        parts = path.relative_to(_PKG).with_suffix("").parts
        found.append(".".join(["iisan", *(parts[:-1] if parts[-1] == "__init__" else parts)]))
    return found


@functools.cache
def imports(module: str) -> frozenset[str]:
    """iisan modules that ``module`` imports anywhere in its source (function-level imports
    included): ``from iisan.x import y`` counts ``iisan.x.y`` when that is a module, else ``iisan.x``."""
    tree = ast.parse(module_file(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("iisan."))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "iisan"
        ):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if module_file(sub) else node.module)
    return frozenset(found - {module})


def _imports(module: str) -> frozenset[str]:
    # this module hashes code; it does not change what a stage computes
    return imports(module) - {__name__}


def closure(entries) -> list[str]:
    """``entries`` and every iisan module they import, transitively; sorted."""
    seen, todo = set(), list(entries)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_imports(m))
    return sorted(seen)


def stage_modules(stage: str, method=None) -> list[str]:
    """The modules a stage runs (``method``: a training run's method, an
    ``iisan.train.methods.Method``; its modules are named in the registry as strings)."""
    return closure([*STAGES[stage], *(method.modules if method is not None else ())])


def code_hash(stage: str, method: str | None = None) -> str:
    h = hashlib.sha256()
    for module in stage_modules(stage, method):
        path = module_file(module)
        h.update(path.relative_to(_PKG).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
