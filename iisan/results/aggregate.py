"""An experiment's runs (seeds x grid points) -> its metrics.json.

The grid point with the best mean *validation* HR@k is selected (a test metric
never chooses a setting); the experiment's metrics are that point's mean over
seeds, with the standard deviation and every seed's values beside them, and
the whole grid.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path

from iisan.core.errors import DataError
from iisan.core.outputs import atomic_json

log = logging.getLogger(__name__)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summary(metrics: list[dict], split: str) -> tuple[dict, dict]:
    keys = metrics[0][split].keys()
    pairs = {key: _mean_sd([m[split][key] for m in metrics]) for key in keys}
    return {key: v[0] for key, v in pairs.items()}, {key: v[1] for key, v in pairs.items()}


def _read(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise DataError(path, "the run has not finished (no metrics.json)", "train it first (snakemake builds it)")
    return json.loads(path.read_text())


def aggregate(runs: list[dict], out) -> dict:
    """``runs``: [{"dir", "point", "seed"}]; writes ``out``/metrics.json and efficiency.json."""
    out = Path(out)
    # run folders are recorded relative to the experiment folder, so results can move
    loaded = [{**r, "dir": os.path.relpath(r["dir"], out), "metrics": _read(Path(r["dir"]))} for r in runs]
    ks = {r["metrics"]["metric_k"] for r in loaded}
    if len(ks) != 1:
        raise DataError(out, f"runs use different metric_k {sorted(ks)}", "give every run the same `metric_k`")
    k = ks.pop()
    points: dict[str, list[dict]] = {}
    for r in loaded:
        points.setdefault(json.dumps(r["point"], sort_keys=True), []).append(r)
    grid = []
    for rs in points.values():
        ms = [r["metrics"] for r in rs]
        valid, valid_sd = _summary(ms, "valid")
        test, test_sd = _summary(ms, "test")
        grid.append({"point": rs[0]["point"], "seeds": [r["seed"] for r in rs], "runs": [str(r["dir"]) for r in rs],
                     "valid": valid, "valid_sd": valid_sd, "test": test, "test_sd": test_sd})  # fmt: skip
    chosen = max(grid, key=lambda g: g["valid"][f"HR@{k}"])  # first in grid order on a tie
    for g in grid:
        g["selected"] = g is chosen
    selected = [r for r in loaded if str(r["dir"]) in chosen["runs"]]
    first = selected[0]["metrics"]
    metrics = {
        "valid": chosen["valid"],
        "test": chosen["test"],
        "sd": {"valid": chosen["valid_sd"], "test": chosen["test_sd"]},
        "seeds": chosen["seeds"],
        "runs": chosen["runs"],
        "per_seed": [
            {
                "seed": r["seed"],
                "run": str(r["dir"]),
                "valid": r["metrics"]["valid"],
                "test": r["metrics"]["test"],
                "best_epoch": r["metrics"]["best_epoch"],
            }
            for r in selected
        ],
        "selected_point": chosen["point"],
        "grid": grid,
        "best_epoch": statistics.fmean(r["metrics"]["best_epoch"] for r in selected),
        "metric_k": k,
        "config": {key: v for key, v in first["config"].items() if key != "seed"},
        "model_config": first["model_config"],
        "dataset": first["dataset"],
        "caches": first["caches"],
        "aggregate": True,
    }
    effs = [json.loads((out / r["dir"] / "efficiency.json").read_text()) for r in selected]
    efficiency = {**effs[0], "seconds_per_epoch": statistics.fmean(e["seconds_per_epoch"] for e in effs),
                  "peak_memory_bytes": max(e["peak_memory_bytes"] for e in effs), "runs": len(effs)}  # fmt: skip
    efficiency.pop("seconds_per_epoch_all", None)
    atomic_json(out / "efficiency.json", efficiency)
    atomic_json(out / "metrics.json", metrics)
    log.info("%s: %d runs, selected %s by valid HR@%d %.4f (test %.4f ± %.4f over %d seeds)", out, len(loaded),
             chosen["point"] or "the only setting", k, chosen["valid"][f"HR@{k}"], chosen["test"][f"HR@{k}"],
             chosen["test_sd"][f"HR@{k}"], len(selected))  # fmt: skip
    return metrics


def run_dirs(exp_dir) -> list[Path]:
    """The run folders behind an experiment's metrics.json (itself, for a single run)."""
    exp_dir = Path(exp_dir)
    m = json.loads((exp_dir / "metrics.json").read_text())
    return [exp_dir / d for d in m["runs"]] if m.get("aggregate") else [exp_dir]
