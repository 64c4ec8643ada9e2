"""Paper-style tables (Markdown + CSV) and plots (PNG) from finished runs.

A run is ``results/{dataset}/{experiment}/`` with metrics.json and
efficiency.json. Experiments are described by config (group, label, text
backbone); a run that is missing is listed in the report's notes, not fatal.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from iisan import methods
from iisan.efficiency import tpme
from iisan.errors import ConfigError

log = logging.getLogger(__name__)

GROUPS = ("main", "scaling", "ablation", "baseline")


def _load_runs(results: Path, experiments: dict) -> tuple[list[dict], list[str]]:
    runs, missing = [], []
    for ds, exps in experiments.items():
        for name, desc in exps.items():
            d = results / ds / name
            if not (d / "metrics.json").is_file():
                missing.append(f"{ds}/{name}")
                continue
            m = json.loads((d / "metrics.json").read_text())
            eff = json.loads((d / "efficiency.json").read_text()) if (d / "efficiency.json").is_file() else {}
            runs.append(
                {
                    "dataset": ds,
                    "experiment": name,
                    "label": desc.get("label", name),
                    "group": desc.get("group", "main"),
                    "text_backbone": desc.get("text_backbone"),
                    "text_params_b": desc.get("text_params_b"),
                    "metrics": m,
                    "eff": eff,
                }
            )
    return runs, missing


def _write_table(out: Path, name: str, title: str, header: list[str], rows: list[list], note: str = "") -> None:
    with (out / f"{name}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    if note:
        lines += ["", note]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def metric_k(runs) -> int:
    """The runs' HR@k / NDCG@k cut-off (``metric_k``); they must agree to share a table."""
    ks = {r["metrics"].get("metric_k", 10) for r in runs}
    if len(ks) > 1:
        raise ConfigError(
            f"the runs of one report use different `metric_k` values {sorted(ks)}; give them the same one"
        )
    return ks.pop() if ks else 10


def _quality_rows(runs, k):
    return [
        [
            r["dataset"],
            r["experiment"],
            r["label"],
            100 * r["metrics"]["test"][f"HR@{k}"],
            100 * r["metrics"]["test"][f"NDCG@{k}"],
            100 * r["metrics"]["valid"][f"HR@{k}"],
            r["metrics"]["best_epoch"],
        ]
        for r in runs
    ]


def quality_header(k):
    return [
        "dataset",
        "experiment",
        "method",
        f"test HR@{k} (%)",
        f"test NDCG@{k} (%)",
        f"valid HR@{k} (%)",
        "best epoch",
    ]


def _timed(r) -> bool:
    """A run with training time to report (popularity has none)."""
    return bool(r["eff"]) and methods.get(r["eff"]["method"]).trains


def _efficiency_rows(runs):
    by_ds: dict[str, dict] = {}
    for r in runs:
        if _timed(r):
            by_ds.setdefault(r["dataset"], {})[r["experiment"]] = r
    rows = []
    for ds, rs in by_ds.items():
        scores = tpme({k: v["eff"] for k, v in rs.items()})
        fft = next((v["eff"] for v in rs.values() if methods.get(v["eff"]["method"]).reference), None)
        for k, v in rs.items():
            e = v["eff"]
            ratio = (
                f"{e['seconds_per_epoch'] / fft['seconds_per_epoch']:.3f}" if fft and fft["seconds_per_epoch"] else "-"
            )
            rows.append(
                [
                    ds,
                    k,
                    v["label"],
                    e["seconds_per_epoch"],
                    e["peak_memory_bytes"] / 2**20,
                    e.get("peak_memory_kind", ""),
                    e["trainable_parameters"],
                    scores[k],
                    ratio,
                ]
            )
    return rows


def _plots(out: Path, runs, storage_rows, k) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    scaling = sorted((r for r in runs if r["group"] == "scaling"), key=lambda r: (r["text_params_b"] or 0, r["label"]))
    if scaling:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for ds in sorted({r["dataset"] for r in scaling}):
            rs = [r for r in scaling if r["dataset"] == ds]
            ax.plot([r["label"] for r in rs], [100 * r["metrics"]["test"][f"HR@{k}"] for r in rs], marker="o", label=ds)
        ax.set_ylabel(f"test HR@{k} (%)")
        ax.set_title(f"HR@{k} by text encoder")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "hr_by_text_encoder.png", dpi=120)
        plt.close(fig)
        made.append("hr_by_text_encoder.png")
    eff = [r for r in runs if _timed(r)]
    if eff:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        labels = [f"{r['dataset']}/{r['label']}" for r in eff]
        axes[0].barh(labels, [r["eff"]["seconds_per_epoch"] for r in eff])
        axes[0].set_xlabel("training seconds per epoch")
        axes[1].barh(labels, [r["eff"]["peak_memory_bytes"] / 2**20 for r in eff])
        axes[1].set_xlabel(f"peak memory, MiB ({eff[0]['eff'].get('peak_memory_kind', '')})")
        axes[1].set_yticklabels([])
        fig.tight_layout()
        fig.savefig(out / "time_memory_by_method.png", dpi=120)
        plt.close(fig)
        made.append("time_memory_by_method.png")
    if storage_rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [f"{r[0]}/{r[1]}" for r in storage_rows]
        ax.barh(names, [r[4] for r in storage_rows], label="all layers")
        ax.barh(names, [r[3] for r in storage_rows], label="selected layers")
        ax.set_xlabel("cache size, MiB")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "cache_storage.png", dpi=120)
        plt.close(fig)
        made.append("cache_storage.png")
    return made


def _storage_rows(results: Path):
    from iisan import cache

    rows = []
    for done in sorted(results.glob("*/cache/*/*.done")):
        store = Path(json.loads(done.read_text())["store"])
        if not store.exists():
            continue
        i = cache.info(store)
        rows.append(
            [
                done.parts[-4],
                f"{done.parent.name}/{done.stem}",
                len(i["layers"]),
                i["bytes_selected"] / 2**20,
                i["bytes_all_layers"] / 2**20,
                i["bytes_on_disk"] / 2**20,
            ]
        )
    return rows


def build_report(results, out, experiments: dict | None = None) -> dict:
    """Write tables and plots to ``out``. ``experiments``: {dataset: {experiment: {group, label, ...}}};
    by default every run found under ``results``."""
    results, out = Path(results), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if experiments is None:
        experiments = {}
        for m in sorted(results.glob("*/*/metrics.json")):
            experiments.setdefault(m.parts[-3], {})[m.parts[-2]] = {}
    runs, missing = _load_runs(results, experiments)
    note = ("Missing (not run or failed), left out: " + ", ".join(missing)) if missing else ""
    k = metric_k(runs)
    for group, title in (
        ("main", "Main comparison"),
        ("scaling", "Scaling by text encoder"),
        ("ablation", "Ablations"),
    ):
        rs = [r for r in runs if r["group"] == group or (group == "main" and r["group"] == "baseline")]
        _write_table(out, group, title, quality_header(k), _quality_rows(rs, k), note)
    _write_table(
        out,
        "efficiency",
        "Efficiency (training phase only; TPME weights 0.45/0.1/0.45, lower is better)",
        [
            "dataset",
            "experiment",
            "method",
            "s/epoch",
            "peak memory (MiB)",
            "memory kind",
            "trainable params",
            "TPME",
            "time / FFT",
        ],
        _efficiency_rows(runs),
        note,
    )
    storage = _storage_rows(results)
    _write_table(
        out,
        "storage",
        "Cache storage: selected vs all layers",
        ["dataset", "cache", "layers kept", "selected (MiB)", "all layers (MiB)", "on disk (MiB)"],
        storage,
    )
    plots = _plots(out, runs, storage, k)
    summary = {"runs": len(runs), "missing": missing, "plots": plots}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("report: %d runs, %d missing, plots %s -> %s", len(runs), len(missing), plots, out)
    return summary
