"""The metrics a report shows, computed from what every finished run stores, so a metric
added to ``config.yaml`` recomputes the report without retraining:

- each user's 0-based target rank among all items (``ranks.npz``): HR, Recall, NDCG and
  MRR at any k. With one held-out target per user, Recall@k equals HR@k; MRR is cut at k
  (a target ranked below k counts 0), as RecBole's MRR@k;
- each test user's top-K list (``topk.npz``, K = the run's ``keep_top``): item coverage@k
  (the share of the catalogue recommended to anyone) and the mean popularity percentile
  of what is recommended (each item's rank by training popularity, 0 = the least popular,
  1 = the most; ties share their mean rank), for k up to K.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iisan.core.errors import ConfigError
from iisan.core.schema import parse, setting

RANKED = ("HR", "Recall", "NDCG", "MRR")  # from ranks.npz
LISTS = ("Coverage", "PopPercentile")  # from topk.npz


@dataclass
class MetricSettings:
    """The metrics of every report table (config.yaml's ``metrics:``)."""

    names: list = setting(
        factory=lambda: ["HR", "NDCG"], description="metrics shown: HR, Recall, NDCG, MRR, Coverage, PopPercentile",
        items={"enum": [*RANKED, *LISTS]}, minItems=1,
    )  # fmt: skip
    at: list | None = setting(
        None, "cut-offs k; null: the runs' metric_k (the paper's 10)", items={"type": "integer", "minimum": 1}
    )


@dataclass(frozen=True)
class Metric:
    name: str
    k: int

    @property
    def label(self) -> str:
        return f"{self.name}@{self.k}"

    @property
    def ranked(self) -> bool:
        return self.name in RANKED


@dataclass(frozen=True)
class MetricSet:
    metrics: tuple = field(default_factory=tuple)

    @classmethod
    def of(cls, spec: dict | None, metric_k: int) -> MetricSet:
        s = parse(MetricSettings, spec or {}, "metrics")
        if not s.names:
            raise ConfigError("metrics.names: name at least one metric")
        return cls(tuple(Metric(n, k) for k in (s.at or [metric_k]) for n in s.names))

    @property
    def ranked(self) -> list[Metric]:
        return [m for m in self.metrics if m.ranked]


def per_user(ranks: np.ndarray, metric: Metric) -> np.ndarray:
    """A ranked metric for each user, from the 0-based rank of their target."""
    r = np.asarray(ranks, dtype=np.float64)
    hit = r < metric.k
    if metric.name in ("HR", "Recall"):
        return hit.astype(np.float64)
    if metric.name == "NDCG":
        return np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    if metric.name == "MRR":
        return np.where(hit, 1.0 / (r + 1.0), 0.0)
    raise ConfigError(f"{metric.name} is not a ranked metric ({RANKED})")


def coverage(topk: np.ndarray, k: int, n_items: int) -> float:
    """The share of the catalogue's n_items that some user's top-k holds (-1 and 0 are no item)."""
    ids = topk[:, :k]
    return len(np.unique(ids[ids > 0])) / n_items


def popularity_percentiles(popularity: np.ndarray) -> np.ndarray:
    """Each item's popularity percentile among items 1..N (index 0: padding, 0)."""
    from scipy.stats import rankdata

    pop = np.asarray(popularity, dtype=np.float64)[1:]
    out = np.zeros(len(pop) + 1)
    out[1:] = (rankdata(pop, method="average") - 1) / max(len(pop) - 1, 1)
    return out


def pop_percentile(topk: np.ndarray, k: int, popularity: np.ndarray) -> float:
    """The mean popularity percentile over every recommended entry of every top-k list."""
    ids = topk[:, :k]
    ids = ids[ids > 0]
    return float(popularity_percentiles(popularity)[ids].mean()) if len(ids) else float("nan")


def run_values(run_dir, metrics, split: str = "test") -> dict[str, float | None]:
    """One run's value of each metric (a fraction), by label; None where the run lacks what it
    needs (a list metric needs ``topk.npz`` holding at least k items a user)."""
    run_dir = Path(run_dir)
    out: dict[str, float | None] = {m.label: None for m in metrics}
    if any(m.ranked for m in metrics) and (run_dir / "ranks.npz").is_file():
        with np.load(run_dir / "ranks.npz") as z:
            ranks = z[split]
        out |= {m.label: float(per_user(ranks, m).mean()) for m in metrics if m.ranked}
    lists = [m for m in metrics if not m.ranked]
    if lists and split == "test" and (run_dir / "topk.npz").is_file():
        with np.load(run_dir / "topk.npz") as z:
            topk, popularity = z["test"], z["popularity"]
        for m in lists:
            if topk.shape[1] >= m.k:
                out[m.label] = (coverage(topk, m.k, len(popularity) - 1) if m.name == "Coverage"
                                else pop_percentile(topk, m.k, popularity))  # fmt: skip
    return out


def experiment_values(run_dirs, metrics) -> dict[str, tuple[float, float] | None]:
    """(mean, sd) of each metric over an experiment's runs (its seeds); None if a run lacks it."""
    per_run = [run_values(d, metrics) for d in run_dirs]
    out = {}
    for m in metrics:
        values = [v[m.label] for v in per_run]
        out[m.label] = (None if not values or any(x is None for x in values) else
                        (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0))  # fmt: skip
    return out


def missing_note(metric: Metric) -> str:
    what = "ranks.npz" if metric.ranked else f"topk.npz with at least {metric.k} items a user (`keep_top`)"
    return f"{metric.label}: n/a where a run has no {what}; retrain those runs to fill it"
