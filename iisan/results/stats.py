"""Per-user results and paired significance tests (scipy), as the paper marks its
best results: a paired t-test over users (p < 0.05), and a Wilcoxon signed-rank test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iisan.results.metrics import per_user


def per_user_over_runs(run_dirs: list[Path], metrics, split: str = "test") -> dict[str, np.ndarray]:
    """Each ranked metric (iisan.results.metrics.Metric) per user, averaged over an experiment's
    runs (its seeds), by label."""
    values = []
    for d in run_dirs:
        with np.load(Path(d) / "ranks.npz") as z:
            values.append({m.label: per_user(z[split], m) for m in metrics if m.ranked})
    return {key: np.mean([v[key] for v in values], axis=0) for key in values[0]}


def paired_tests(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of per-user values a vs b (two-sided).

    Identical vectors have nothing to test: both p-values are 1."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired tests need the same users: {a.shape} vs {b.shape}")
    d = a - b
    if not d.any():
        return {"t": 0.0, "p_ttest": 1.0, "w": 0.0, "p_wilcoxon": 1.0}
    w = stats.wilcoxon(a, b)
    if np.all(d == d[0]):  # every user differs by the same amount: no variance, the t statistic is infinite
        t_stat, p_t = float(np.sign(d[0]) * np.inf), 0.0
    else:
        t = stats.ttest_rel(a, b)
        t_stat, p_t = float(t.statistic), float(t.pvalue)
    return {"t": t_stat, "p_ttest": p_t, "w": float(w.statistic), "p_wilcoxon": float(w.pvalue)}
