"""The runs an experiment asks for: one per seed and grid point.

An experiment with one seed and no grid is one run, at ``results/{ds}/{exp}/``.
With ``seeds`` (its own, or its target's) and/or a ``grid`` it is several runs at
``results/{ds}/{exp}/{run}/`` (``seed-3``, ``lr-0.001_seed-3``), sharing the
experiment's caches, and ``results/{ds}/{exp}/metrics.json`` aggregates them
(``iisan.results.aggregate``). Nothing here imports torch: the workflow reads it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass

from iisan.core.errors import ConfigError


def merged_settings(config: dict, ds: str, exp: str) -> dict:
    """train_defaults, then the dataset's train, then the experiment's (last wins), plus its method."""
    s = dict(config.get("train_defaults", {}))
    s.update(config["datasets"][ds].get("train", {}))
    e = config["experiments"][exp]
    s.update(e.get("train", {}))
    s["method"] = e.get("method", "iisan")
    return s


@dataclass(frozen=True)
class Run:
    name: str  # folder under results/{ds}/{exp}/ ("" = the experiment folder itself)
    point: dict  # the grid point's settings ({} without a grid)
    seed: int
    settings: dict  # the run's full train settings (method, point and seed included)


def _value_name(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    if re.fullmatch(r"[A-Za-z0-9.+-]{1,24}", text):
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def point_name(point: dict) -> str:
    """A folder-safe name of a grid point: lr-0.001_batch_size-128."""
    return "_".join(f"{k}-{_value_name(v)}" for k, v in point.items())


def experiment_seeds(config: dict, exp: str) -> list[int] | None:
    """The experiment's own seeds, else those of the targets that list it (they must agree), else None."""
    own = config["experiments"][exp].get("seeds")
    if own:
        return list(own)
    given = {
        tuple(t["seeds"]): name for name, t in config["targets"].items() if t.get("seeds") and exp in t["experiments"]
    }
    if len(given) > 1:
        raise ConfigError(f"experiments.{exp} is in targets {sorted(given.values())} with different `seeds`; "
                          f"give experiments.{exp} its own `seeds`")  # fmt: skip
    return list(next(iter(given))) if given else None


def is_multi(config: dict, exp: str) -> bool:
    """Whether the experiment's metrics.json aggregates several runs."""
    return bool(experiment_seeds(config, exp) or config["experiments"][exp].get("grid"))


def experiment_runs(config: dict, ds: str, exp: str) -> list[Run]:
    base = merged_settings(config, ds, exp)
    grid = config["experiments"][exp].get("grid") or {}
    seeds = experiment_seeds(config, exp)
    if not grid and not seeds:
        return [Run("", {}, base["seed"], base)]
    runs = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        for seed in seeds or [base["seed"]]:
            name = "_".join(filter(None, [point_name(point), f"seed-{seed}"]))
            runs.append(Run(name, point, seed, {**base, **point, "seed": seed}))
    return runs


def run_named(config: dict, ds: str, exp: str, name: str) -> Run:
    for r in experiment_runs(config, ds, exp):
        if r.name == name:
            return r
    raise ConfigError(f"experiment {exp!r} on {ds!r} has no run {name!r}")
