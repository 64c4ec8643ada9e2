"""The report's metrics: by hand, against an independent implementation (torchmetrics'
retrieval metrics) on generated rankings, and recomputed from finished runs' files."""

import csv
import json

import numpy as np
import pytest
import torch

from iisan.core.errors import ConfigError
from iisan.results.metrics import Metric, MetricSet, coverage, per_user, pop_percentile, run_values
from iisan.results.report import build_report

from conftest import QUICK, fit


def test_list_metrics_by_hand():
    topk = np.array([[3, 1, 2], [3, 4, -1], [1, 3, 5]])  # -1: fewer items than k were left
    assert coverage(topk, 1, n_items=10) == 2 / 10  # items 3 and 1
    assert coverage(topk, 3, n_items=10) == 5 / 10
    popularity = np.array([0.0, 0.1, 0.0, 0.5, 0.3, 0.1])  # items 1..5; 1 and 5 tie
    # percentiles of items 1..5: ranks 2.5, 1, 5, 4, 2.5 of 5 -> (r - 1) / 4
    pct = {1: 0.375, 2: 0.0, 3: 1.0, 4: 0.75, 5: 0.375}
    assert pop_percentile(topk, 2, popularity) == pytest.approx(np.mean([pct[i] for i in (3, 1, 3, 4, 1, 3)]))


def test_ranked_metrics_equal_torchmetrics_on_generated_rankings():
    from torchmetrics.functional import retrieval as tm

    rng = np.random.default_rng(0)
    n_users, n_items = 200, 300
    scores = rng.standard_normal((n_users, n_items))  # distinct scores: no ties to break
    target = rng.integers(0, n_items, n_users)
    ranks = (scores > scores[np.arange(n_users), target][:, None]).sum(1)  # 0-based rank of the target
    relevant = np.zeros_like(scores, dtype=bool)
    relevant[np.arange(n_users), target] = True
    theirs = {"HR": tm.retrieval_hit_rate, "Recall": tm.retrieval_recall, "NDCG": tm.retrieval_normalized_dcg,
              "MRR": tm.retrieval_reciprocal_rank}  # fmt: skip
    for k in (1, 5, 10, 20, 50):
        for name, fn in theirs.items():
            ref = np.mean([fn(torch.from_numpy(scores[u]), torch.from_numpy(relevant[u]), top_k=k).item()
                           for u in range(n_users)])  # fmt: skip
            assert per_user(ranks, Metric(name, k)).mean() == pytest.approx(ref, abs=1e-6), (name, k)


def test_bad_metric_settings_are_named():
    with pytest.raises(ConfigError, match="metrics"):
        MetricSet.of({"names": ["AUC"]}, 10)
    with pytest.raises(ConfigError, match="at"):
        MetricSet.of({"at": [0]}, 10)
    assert [m.label for m in MetricSet.of({"names": ["HR", "MRR"], "at": [5, 20]}, 10).metrics] == [
        "HR@5", "MRR@5", "HR@20", "MRR@20"]  # fmt: skip


def test_a_report_recomputes_any_metric_from_finished_runs(small_demo, caches, tmp_path):
    _, data_dir = small_demo
    results = tmp_path / "results"
    fit(data_dir, results / "demo/vs", caches, **QUICK)
    fit(data_dir, results / "demo/pop", method="pop")
    with np.load(results / "demo/vs/topk.npz") as z:
        topk, popularity = z["test"], z["popularity"]
    with np.load(results / "demo/vs/ranks.npz") as z:
        ranks = z["test"]
    m = json.loads((results / "demo/vs/metrics.json").read_text())
    assert topk.shape[1] == 50 and (ranks < 10).mean() == pytest.approx(m["test"]["HR@10"])
    # a target in the top-10 list is a hit: the lists are the rankings the ranks came from
    data = np.load(data_dir / "splits.npz")
    in_list = (topk[:, :10] == data["test_target"][:, None]).any(1)
    assert np.array_equal(in_list, ranks < 10)
    exps = {"demo": {"vs": {"group": "main", "label": "IISAN"}, "pop": {"group": "main", "label": "popularity"}}}
    spec = {"names": ["HR", "NDCG", "MRR", "Coverage", "PopPercentile"], "at": [10, 20]}
    build_report(results, tmp_path / "rep", experiments=exps, metrics=spec)
    rows = {r["experiment"]: r for r in csv.DictReader((tmp_path / "rep/main.csv").read_text().splitlines())}
    brute = {"NDCG@20": np.where(ranks < 20, 1 / np.log2(ranks + 2.0), 0).mean(),
             "MRR@10": np.where(ranks < 10, 1 / (ranks + 1.0), 0).mean(),
             "Coverage@10": len(np.unique(topk[:, :10][topk[:, :10] > 0])) / (len(popularity) - 1)}  # fmt: skip
    for label, value in brute.items():
        assert float(rows["vs"][f"test {label} (%)"]) == pytest.approx(100 * value), label
    # popularity recommends the same top items to everyone: little coverage, the most popular items
    assert float(rows["pop"]["test Coverage@10 (%)"]) < float(rows["vs"]["test Coverage@10 (%)"])
    assert float(rows["pop"]["test PopPercentile@10 (%)"]) > max(95, float(rows["vs"]["test PopPercentile@10 (%)"]))
    best = next(r for r in rows.values() if r["vs"])  # significance for every ranked metric chosen
    assert all(
        best[f"p {t} {m}@{k}"] != "" for t in ("t-test", "Wilcoxon") for m in ("HR", "NDCG", "MRR") for k in (10, 20)
    )
    assert "p t-test Coverage@10" not in best  # a list metric has no per-user values to pair
    md = (tmp_path / "rep/main.md").read_text()
    assert "| test NDCG@20 (%) |" in md and "| test MRR@10 (%) |" in md
    # a run without top-K lists (as runs made before they were kept) says n/a, and why
    (results / "demo/vs/topk.npz").unlink()
    build_report(results, tmp_path / "rep2", experiments=exps, metrics=spec)
    md = (tmp_path / "rep2/main.md").read_text()
    assert "n/a" in md and "Coverage@10: n/a where a run has no topk.npz" in md
    assert run_values(results / "demo/vs", [Metric("Coverage", 10)]) == {"Coverage@10": None}
