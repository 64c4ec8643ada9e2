"""The paper's published numbers (``paper.yaml``): every row of every table, read
once, looked up by (dataset, experiment), and set beside what a target measured.

Nothing here imports torch: the workflow reads it while building the DAG.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from iisan.core.errors import ConfigError

PAPER = Path(__file__).with_name("paper.yaml")
METRICS = ("HR@10", "NDCG@10")  # what the paper reports, in percent
K = 10
SPREAD = 2.0  # "within the seeds' spread": |measured - published| <= SPREAD x sd over seeds


@dataclass(frozen=True)
class Row:
    table: str
    label: str
    dataset: str
    experiment: str | None  # None: a baseline iisan does not implement, or a mean row
    published: dict  # metric -> percent
    group: str | None = None  # rows whose mean a "Mean" row reports
    mean_of: str | None = None  # this row is the paper's mean of that group


@functools.cache
def _load() -> dict:
    return yaml.safe_load(PAPER.read_text())


def tables() -> dict[str, dict]:
    """table id -> {title, targets, rows: [Row]}."""
    out = {}
    for tid, t in _load()["tables"].items():
        rows = [Row(tid, r["label"], r["dataset"], r.get("experiment"), {m: float(r[m]) for m in METRICS},
                    r.get("group"), r.get("mean_of")) for r in t["rows"]]  # fmt: skip
        out[tid] = {"title": t["title"], "targets": list(t["targets"]), "rows": rows}
    return out


def figures() -> dict[str, dict]:
    return dict(_load()["figures"])


def rows() -> list[Row]:
    return [r for t in tables().values() for r in t["rows"]]


@functools.cache
def _published() -> dict[tuple[str, str], dict]:
    found: dict[tuple[str, str], dict] = {}
    for r in rows():
        if r.experiment is None:
            continue
        key = (r.dataset, r.experiment)
        if key in found and found[key] != r.published:  # one model, one number, in every table it appears in
            raise ConfigError(f"{PAPER.name}: {r.dataset}/{r.experiment} is published as {found[key]} and "
                              f"as {r.published} ({r.table}, {r.label!r}); one experiment carries one number")  # fmt: skip
        found[key] = r.published
    return found


def published(dataset: str, experiment: str) -> dict | None:
    """The paper's test HR@10 / NDCG@10 (percent) for this run, or None if it reports none."""
    return _published().get((dataset, experiment))


def _measured(metrics: dict | None, metric: str) -> tuple[float, float, int] | None:
    if metrics is None:
        return None
    seeds = len(metrics.get("seeds", [metrics.get("seed")]))
    sd = metrics.get("sd", {}).get("test", {}).get(metric, 0.0)
    return 100 * metrics["test"][metric], 100 * sd, seeds


def _verdict(diff: float, sd: float, seeds: int) -> str:
    if seeds < 2:
        return "one seed: no spread"
    return "yes" if abs(diff) <= SPREAD * sd else "no"


def reproduction(measured: dict[tuple[str, str], dict], k: int) -> list[dict]:
    """Every published row beside this target's runs. ``measured``: (dataset, experiment) ->
    metrics.json. A row whose run is not in the target says so; a "Mean" row is the mean of
    its group's measured means once every one of them has run."""
    out = []
    for t in tables().values():
        for r in t["rows"]:
            for metric in METRICS:
                line = {"table": r.table, "row": r.label, "dataset": r.dataset, "experiment": r.experiment or "",
                        "metric": metric, "published": r.published[metric], "measured": None, "sd": None,
                        "seeds": None, "difference": None, "within spread": "", "status": ""}  # fmt: skip
                got = _row_value(t["rows"], r, metric, measured) if k == K else None
                if isinstance(got, str):
                    line["status"] = got
                elif k != K:
                    line["status"] = f"runs report @{k}; the paper reports @{K}"
                else:
                    mean, sd, seeds = got
                    diff = mean - r.published[metric]
                    verdict = _verdict(diff, sd, seeds) if r.mean_of is None else ""
                    line.update(measured=mean, sd=sd, seeds=seeds, difference=diff, status="measured",
                                **{"within spread": verdict})  # fmt: skip
                out.append(line)
    return out


def _row_value(table_rows, r: Row, metric: str, measured: dict):
    if r.mean_of is not None:
        members = [x for x in table_rows if x.group == r.mean_of]
        got = [_measured(measured.get((x.dataset, x.experiment)), metric) for x in members]
        done = [g for g in got if g is not None]
        if len(done) < len(members):
            return f"mean of {len(members)} rows; {len(done)} measured in this target"
        return statistics.fmean(g[0] for g in done), 0.0, min(g[2] for g in done)
    if r.experiment is None:
        return "not an iisan method (the paper takes it from the MicroLens benchmark)"
    got = _measured(measured.get((r.dataset, r.experiment)), metric)
    return got if got is not None else f"not run in this target (targets: {', '.join(tables()[r.table]['targets'])})"
