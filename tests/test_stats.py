"""Seeds, grids and significance: aggregation selects on validation only, the
paired tests are scipy's on per-user metrics, the report marks what they say."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from iisan.results.aggregate import aggregate, run_dirs
from iisan.results.metrics import Metric, MetricSet, per_user
from iisan.results.report import build_report
from iisan.results.stats import paired_tests, per_user_over_runs

from conftest import write


def test_per_user_metrics_by_hand():
    ranks = np.array([0, 3, 9, 10, 250])
    assert per_user(ranks, Metric("HR", 10)).tolist() == [1, 1, 1, 0, 0]
    assert per_user(ranks, Metric("Recall", 10)).tolist() == [1, 1, 1, 0, 0]  # one held-out target each
    ndcg = [1.0, 1 / math.log2(5), 1 / math.log2(11), 0, 0]
    assert per_user(ranks, Metric("NDCG", 10)).tolist() == pytest.approx(ndcg)
    assert per_user(ranks, Metric("MRR", 10)).tolist() == pytest.approx([1.0, 1 / 4, 1 / 10, 0.0, 0.0])
    assert per_user(ranks, Metric("HR", 5)).tolist() == [1, 1, 0, 0, 0]


TEN = MetricSet.of(None, 10).ranked  # the paper's HR@10 and NDCG@10


def _ranks(path, test, valid=None):
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "ranks.npz", test=np.array(test, np.int32), valid=np.array(valid or test, np.int32))
    return path


def test_paired_tests_are_scipys_on_hand_made_rank_files(tmp_path):
    a = _ranks(tmp_path / "a", [0, 1, 2, 15, 0, 3, 40, 1, 0, 7, 2, 30])
    b1 = _ranks(tmp_path / "b1", [5, 12, 2, 15, 9, 20, 40, 1, 11, 7, 50, 30])
    b2 = _ranks(tmp_path / "b2", [3, 12, 20, 15, 9, 2, 40, 1, 11, 17, 5, 30])
    ua = per_user_over_runs([a], TEN)
    ub = per_user_over_runs([b1, b2], TEN)  # averaged over the two seeds
    seed1 = np.array([5, 12, 2, 15, 9, 20, 40, 1, 11, 7, 50, 30]) < 10
    seed2 = np.array([3, 12, 20, 15, 9, 2, 40, 1, 11, 17, 5, 30]) < 10
    hr_b = (seed1.astype(float) + seed2.astype(float)) / 2
    assert ub["HR@10"].tolist() == hr_b.tolist()
    got = paired_tests(ua["HR@10"], ub["HR@10"])
    # by hand: the paired t statistic and its two-sided p from Student's t with n-1 degrees of freedom
    d = ua["HR@10"] - hr_b
    n = len(d)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    assert got["t"] == pytest.approx(t) and got["p_ttest"] == pytest.approx(2 * stats.t.sf(abs(t), n - 1))
    # Wilcoxon by hand: zero differences dropped, |d| ranked (ties averaged), and the exact two-sided p of the
    # smaller signed-rank sum, enumerating every assignment of signs to the ranks
    nz = d[d != 0]
    order = sorted(abs(x) for x in nz)
    rank = {v: sum(i + 1 for i, w in enumerate(order) if w == v) / order.count(v) for v in set(order)}
    ranks = [rank[abs(x)] for x in nz]
    w = min(
        sum(r for r, x in zip(ranks, nz, strict=True) if x > 0), sum(r for r, x in zip(ranks, nz, strict=True) if x < 0)
    )
    sums = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s) for signs in itertools.product((0, 1), repeat=len(nz))
    ]
    assert got["w"] == w and got["p_wilcoxon"] == pytest.approx(min(1.0, 2 * sum(x <= w for x in sums) / len(sums)))
    assert paired_tests(ua["NDCG@10"], ua["NDCG@10"])["p_ttest"] == 1.0  # nothing to test


def _run(path, seed, valid, test, point=None):
    write(
        path / "metrics.json",
        json.dumps(
            {
                "valid": {"HR@10": valid, "NDCG@10": valid / 2},
                "test": {"HR@10": test, "NDCG@10": test / 2},
                "best_epoch": 3,
                "metric_k": 10,
                "seed": seed,
                "config": {"lr": (point or {}).get("lr", 1e-3), "seed": seed},
                "model_config": {},
                "dataset": {},
                "caches": {},
                "history": [],
            }
        ),
    )
    write(
        path / "efficiency.json",
        json.dumps(
            {
                "method": "iisan",
                "seconds_per_epoch": 2.0 + seed,
                "peak_memory_bytes": 100 * seed,
                "trainable_parameters": 5,
            }
        ),
    )
    return {"dir": str(path), "point": point or {}, "seed": seed}


def test_the_grid_point_is_chosen_on_validation_never_on_test(tmp_path):
    exp = tmp_path / "exp"
    runs = [
        _run(exp / "lr-1_seed-1", 1, valid=0.30, test=0.10, point={"lr": 1}),
        _run(exp / "lr-1_seed-2", 2, valid=0.32, test=0.12, point={"lr": 1}),
        _run(exp / "lr-2_seed-1", 1, valid=0.20, test=0.50, point={"lr": 2}),  # best on test, worse on valid
        _run(exp / "lr-2_seed-2", 2, valid=0.22, test=0.52, point={"lr": 2}),
    ]
    m = aggregate(runs, exp)
    assert m["selected_point"] == {"lr": 1} and m["seeds"] == [1, 2]
    assert m["test"]["HR@10"] == pytest.approx(0.11) and m["sd"]["test"]["HR@10"] == pytest.approx(
        np.std([0.1, 0.12], ddof=1)
    )
    assert m["valid"]["HR@10"] == pytest.approx(0.31) and [s["test"]["HR@10"] for s in m["per_seed"]] == [0.10, 0.12]
    assert [g["selected"] for g in m["grid"]] == [True, False] and m["grid"][1]["test"]["HR@10"] == pytest.approx(0.51)
    assert run_dirs(exp) == [exp / "lr-1_seed-1", exp / "lr-1_seed-2"]
    eff = json.loads((exp / "efficiency.json").read_text())
    assert eff["seconds_per_epoch"] == pytest.approx(3.5) and eff["peak_memory_bytes"] == 200


def test_report_shows_mean_sd_and_marks_a_significant_best(tmp_path):
    results = tmp_path / "results"
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 12, 400) for _ in range(2)]  # mostly hits
    bad = [rng.integers(5, 400, 400) for _ in range(2)]  # mostly misses
    exps = {}
    for name, ranks in (("strong", good), ("weak", bad)):
        runs = []
        for seed, r in enumerate(ranks, 1):
            hr = float((r < 10).mean())
            runs.append(_run(results / "ds" / name / f"seed-{seed}", seed, valid=hr, test=hr))
            _ranks(results / "ds" / name / f"seed-{seed}", r)
        aggregate(runs, results / "ds" / name)
        exps[name] = {"group": "main", "label": name}
    build_report(results, tmp_path / "report", {"ds": exps})
    md = (tmp_path / "report/main.md").read_text()
    strong = json.loads((results / "ds/strong/metrics.json").read_text())
    mean, sd = 100 * strong["test"]["HR@10"], 100 * strong["sd"]["test"]["HR@10"]
    assert f"| ds | strong | strong | {mean:.2f} ± {sd:.2f}* |" in md
    rows = {r["experiment"]: r for r in csv.DictReader((tmp_path / "report/main.csv").read_text().splitlines())}
    assert rows["strong"]["vs"] == "weak" and float(rows["strong"]["p t-test HR@10"]) < 1e-6
    assert rows["weak"]["vs"] == "" and float(rows["strong"]["test HR@10 sd"]) == pytest.approx(sd)
