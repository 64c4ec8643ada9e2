"""Paper-style tables (Markdown + CSV) and plots (PNG) from finished runs.

An experiment is ``results/{dataset}/{experiment}/`` with metrics.json (one run,
or the aggregate of its seeds and grid points) and efficiency.json. Tables give
mean ± sd over seeds; in each table and dataset the best method (by mean test
HR@k) is tested against the runner-up with paired tests over users on per-user
metrics averaged over seeds (t-test, as the paper; and Wilcoxon), marked ``*``
at p < 0.05, with the p-values in the CSV. Each row carries the paper's published
value for its (dataset, experiment) and the difference (empty where the paper
reports none), and ``reproduction.md`` lists every row of every published table
beside what this target measured (iisan.results.paper). A missing experiment is
listed in the notes, not fatal. A time-and-memory study (a target with ``batch_sizes``) gets
its own report (``build_profile_report``).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from iisan.core.errors import ConfigError
from iisan.core.outputs import atomic_json
from iisan.results import paper, plots
from iisan.results.aggregate import run_dirs
from iisan.results.efficiency import tpme
from iisan.results.metrics import MetricSet, experiment_values, missing_note
from iisan.results.stats import paired_tests, per_user_over_runs
from iisan.train import methods
from iisan.train.settings import TrainConfig

log = logging.getLogger(__name__)

ALPHA = 0.05  # significance level of the `*` marks
TABLES = (("main", "Main comparison", ("main", "baseline")), ("scaling", "Scaling by text encoder", ("scaling",)),
          ("ablation", "Ablations", ("ablation",)), ("layers", "LayerDrop: the blocks kept", ("layers",)),
          ("multimodal_text", "Multimodal text: titles and generated captions", ("multimodal_text",)))  # fmt: skip


def _load(results: Path, experiments: dict) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    for ds, exps in experiments.items():
        for name, desc in exps.items():
            d = results / ds / name
            if not (d / "metrics.json").is_file():
                missing.append(f"{ds}/{name}")
                continue
            m = json.loads((d / "metrics.json").read_text())
            eff = json.loads((d / "efficiency.json").read_text()) if (d / "efficiency.json").is_file() else {}
            rows.append({"dataset": ds, "experiment": name, "label": desc.get("label", name),
                         "group": desc.get("group", "main"), "text_backbone": desc.get("text_backbone"),
                         "text_params_b": desc.get("text_params_b"), "text_layers": desc.get("text_layers"),
                         "metrics": m, "eff": eff, "runs": run_dirs(d)})  # fmt: skip
    return rows, missing


def metric_k(runs) -> int:
    """The runs' HR@k / NDCG@k cut-off (``metric_k``); they must agree to share a table."""
    ks = {r["metrics"]["metric_k"] for r in runs}
    if len(ks) > 1:
        raise ConfigError(
            f"the runs of one report use different `metric_k` values {sorted(ks)}; give them the same one"
        )
    return ks.pop() if ks else TrainConfig().metric_k


def _sd(r, split, key) -> float:
    return r["metrics"].get("sd", {}).get(split, {}).get(key, 0.0)


def _significance(rows: list[dict], k: int, ms: MetricSet) -> dict[int, dict]:
    """Per dataset: the best row (mean test HR@k) against the runner-up, by row index, on every
    ranked metric of the report."""
    found = {}
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        idx = [
            i for i, r in enumerate(rows) if r["dataset"] == ds and all((d / "ranks.npz").is_file() for d in r["runs"])
        ]
        if len(idx) < 2 or not ms.ranked:
            continue
        best, second = sorted(idx, key=lambda i: rows[i]["metrics"]["test"][f"HR@{k}"], reverse=True)[:2]
        a, b = (per_user_over_runs(rows[i]["runs"], ms.ranked) for i in (best, second))
        found[best] = {"vs": rows[second]["experiment"], **{key: paired_tests(a[key], b[key]) for key in a}}
    return found


def _values(r: dict, ms: MetricSet) -> dict[str, tuple[float, float] | None]:
    """(mean, sd) over seeds of each report metric, from the runs' ranks and top-K lists; the
    run's own metrics.json where those files are absent (as for runs made before they were kept)."""
    got = experiment_values(r["runs"], ms.metrics)
    for label, v in got.items():
        if v is None and label in r["metrics"]["test"]:
            got[label] = (r["metrics"]["test"][label], _sd(r, "test", label))
    return got


def _quality_table(rows: list[dict], k: int, ms: MetricSet) -> tuple[list[str], list[list], list[list]]:
    """Header, CSV rows (numbers) and Markdown rows (mean ± sd, marks) of a quality table."""
    labels = [m.label for m in ms.metrics]
    header = ["dataset", "experiment", "method"]
    for label in labels:
        header += [f"test {label} (%)", f"test {label} sd"]
    header += [f"valid HR@{k} (%)", f"valid HR@{k} sd"]
    header += [f"paper test {key} (%)" for key in paper.METRICS] + [f"difference {key}" for key in paper.METRICS]
    header += ["best epoch", "seeds", "vs"]
    header += [f"p {test} {m.label}" for m in ms.ranked for test in ("t-test", "Wilcoxon")]
    sig = _significance(rows, k, ms)
    csv_rows, md_rows = [], []
    for i, r in enumerate(rows):
        m, s = r["metrics"], sig.get(i)
        n_seeds = len(m.get("seeds", [m.get("seed")]))
        line, cells = [r["dataset"], r["experiment"], r["label"]], [r["dataset"], r["experiment"], r["label"]]
        values = _values(r, ms)
        values[f"valid HR@{k}"] = (m["valid"][f"HR@{k}"], _sd(r, "valid", f"HR@{k}"))
        for label in [*labels, f"valid HR@{k}"]:
            if values[label] is None:
                line += ["", ""]
                cells.append("n/a")
                continue
            mean, sd = (100 * x for x in values[label])
            line += [mean, sd]
            mark = "*" if s and label in s and s[label]["p_ttest"] < ALPHA else ""
            cells.append(f"{mean:.2f} ± {sd:.2f}{mark}" if n_seeds > 1 else f"{mean:.2f}{mark}")
        pub = paper.published(r["dataset"], r["experiment"]) if k == paper.K else None
        diffs = [100 * m["test"][key] - pub[key] for key in paper.METRICS] if pub else ["", ""]
        line += [pub[key] for key in paper.METRICS] + diffs if pub else ["", "", "", ""]
        cells += [" / ".join(f"{pub[key]:.2f}" for key in paper.METRICS) if pub else "",
                  " / ".join(f"{d:+.2f}" for d in diffs) if pub else ""]  # fmt: skip
        pvals = (
            [s[mt.label][p] for mt in ms.ranked for p in ("p_ttest", "p_wilcoxon")]
            if s
            else [""] * (2 * len(ms.ranked))
        )
        line += [m["best_epoch"], n_seeds, s["vs"] if s else "", *pvals]
        cells += [f"{m['best_epoch']:g}", str(n_seeds)]
        csv_rows.append(line)
        md_rows.append(cells)
    md_header = ["dataset", "experiment", "method", *[f"test {label} (%)" for label in labels], f"valid HR@{k} (%)",
                 "paper HR@10 / NDCG@10 (%)", "difference", "best epoch", "seeds"]  # fmt: skip
    return header, csv_rows, [md_header, *md_rows]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _write_md(path: Path, title: str, rows: list[list], notes: list[str]) -> None:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    header, body = rows[0], rows[1:]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in body]
    lines += ["", *[n for n in notes if n]] if any(notes) else []
    path.write_text("\n".join(lines) + "\n")


def _write_reproduction(out: Path, lines: list[dict]) -> None:
    """reproduction.csv (one line per row and metric) and reproduction.md (one table per paper table)."""
    header = list(lines[0])
    _write_csv(out / "reproduction.csv", header, [[ln[h] for h in header] for ln in lines])
    num = lambda v, fmt="{:.2f}": "" if v is None else fmt.format(v)
    md = ["# The paper beside this target", "",
          f"Published test metrics (percent) of every row of every table, beside this target's mean ± sd over "
          f"seeds. Within spread: |measured − published| ≤ {paper.SPREAD:g} sd.", ""]  # fmt: skip
    tables = paper.tables()
    for tid, t in tables.items():
        md += [f"## {t['title']}", "", f"Targets: {', '.join(t['targets'])}", "",
               "| row | dataset | experiment | " + " | ".join(f"{m} paper | {m} ours | {m} diff | {m} within"
                                                          for m in paper.METRICS) + " | status |",
               "|" + "---|" * (4 * len(paper.METRICS) + 4)]  # fmt: skip
        rows = [ln for ln in lines if ln["table"] == tid]
        for i in range(0, len(rows), len(paper.METRICS)):
            per = rows[i : i + len(paper.METRICS)]
            cells = [per[0]["row"], per[0]["dataset"], per[0]["experiment"]]
            for ln in per:
                ours = (
                    ""
                    if ln["measured"] is None
                    else num(ln["measured"])
                    + (f" ± {ln['sd']:.2f}" if (ln["seeds"] or 0) > 1 and ln["within spread"] else "")
                )
                cells += [num(ln["published"]), ours, num(ln["difference"], "{:+.2f}"), ln["within spread"]]
            md.append("| " + " | ".join([*cells, per[0]["status"]]) + " |")
        md.append("")
    (out / "reproduction.md").write_text("\n".join(md))


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
        ref = next((v["eff"] for v in rs.values() if methods.get(v["eff"]["method"]).reference), None)
        for k, v in rs.items():
            e = v["eff"]
            ratio = (
                f"{e['seconds_per_epoch'] / ref['seconds_per_epoch']:.3f}" if ref and ref["seconds_per_epoch"] else "-"
            )
            rows.append([ds, k, v["label"], e["seconds_per_epoch"], e["peak_memory_bytes"] / 2**20,
                         e.get("peak_memory_kind", ""), e["trainable_parameters"], scores[k], ratio])  # fmt: skip
    return rows


def _storage_rows(results: Path):
    from iisan.extract import cache

    rows = []
    for done in sorted(results.glob("*/cache/*/*.done")):
        store = Path(json.loads(done.read_text())["store"])
        if not store.exists():
            continue
        i = cache.info(store)
        rows.append([done.parts[-4], f"{done.parent.name}/{done.stem}", len(i["layers"]), i["bytes_selected"] / 2**20,
                     i["bytes_all_layers"] / 2**20, i["bytes_on_disk"] / 2**20])  # fmt: skip
    return rows


def _grid_rows(runs, k):
    rows = []
    for r in runs:
        for g in r["metrics"].get("grid", []):
            if not g["point"]:
                continue
            rows.append([r["dataset"], r["experiment"], json.dumps(g["point"], sort_keys=True), len(g["seeds"]),
                         100 * g["valid"][f"HR@{k}"], 100 * g["valid_sd"][f"HR@{k}"], 100 * g["test"][f"HR@{k}"],
                         100 * g["test_sd"][f"HR@{k}"], g["selected"]])  # fmt: skip
    return rows


def build_report(results, out, experiments: dict | None = None, metrics: dict | None = None) -> dict:
    """Write tables and plots to ``out``. ``experiments``: {dataset: {experiment: {group, label, ...}}};
    by default every experiment found under ``results``. ``metrics``: config.yaml's ``metrics:``
    (iisan.results.metrics.MetricSettings; by default HR and NDCG at the runs' metric_k)."""
    results, out = Path(results), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if experiments is None:
        experiments = {}
        for m in sorted(results.glob("*/*/metrics.json")):
            experiments.setdefault(m.parts[-3], {})[m.parts[-2]] = {}
    runs, missing = _load(results, experiments)
    k = metric_k(runs)
    ms = MetricSet.of(metrics, k)
    ranked = " or ".join(m.label for m in ms.ranked) or "no ranked metric"
    notes = ["Missing (not run or failed), left out: " + ", ".join(missing) if missing else "",
             f"`*`: better than the runner-up (by test HR@{k}) of its dataset in this table, paired t-test "
             f"over users on test {ranked} averaged over seeds, p < {ALPHA} (p-values, also Wilcoxon's, in the "
             "CSV)."]  # fmt: skip
    for name, title, groups in TABLES:
        rs = [r for r in runs if r["group"] in groups]
        header, csv_rows, md_rows = _quality_table(rs, k, ms)
        _write_csv(out / f"{name}.csv", header, csv_rows)
        na = [missing_note(mt) for j, mt in enumerate(ms.metrics) if any(row[3 + j] == "n/a" for row in md_rows[1:])]
        _write_md(out / f"{name}.md", title, md_rows, [*notes, *na])
    _write_reproduction(out, paper.reproduction({(r["dataset"], r["experiment"]): r["metrics"] for r in runs}, k))
    eff_header = ["dataset", "experiment", "method", "s/epoch", "peak memory (MiB)", "memory kind", "trainable params",
                  "TPME", "time / FFT"]  # fmt: skip
    eff = _efficiency_rows(runs)
    _write_csv(out / "efficiency.csv", eff_header, eff)
    _write_md(out / "efficiency.md", "Efficiency (training phase only; TPME weights 0.45/0.1/0.45, lower is better)",
              [eff_header, *eff], notes[:1])  # fmt: skip
    storage_header = ["dataset", "cache", "layers kept", "selected (MiB)", "all layers (MiB)", "on disk (MiB)"]
    storage = _storage_rows(results)
    _write_csv(out / "storage.csv", storage_header, storage)
    _write_md(out / "storage.md", "Cache storage: selected vs all layers", [storage_header, *storage], [])
    grid_header = ["dataset", "experiment", "setting", "seeds", f"valid HR@{k} (%)", f"valid HR@{k} sd",
                   f"test HR@{k} (%)", f"test HR@{k} sd", "selected (on valid)"]  # fmt: skip
    _write_csv(out / "grid.csv", grid_header, _grid_rows(runs, k))
    made = plots.report_plots(out, runs, [r for r in runs if _timed(r)], storage, k)
    summary = {"runs": len(runs), "missing": missing, "plots": made}
    atomic_json(out / "summary.json", summary)
    log.info("report: %d experiments, %d missing, plots %s -> %s", len(runs), len(missing), made, out)
    return summary


def build_profile_report(profiles: list[str], out, labels: dict | None = None) -> dict:
    """Seconds per epoch and peak memory against batch size, one line per method (Figure 5)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(Path(p).read_text()) | {"experiment": Path(p).parts[-3], "dataset": Path(p).parts[-4]}
            for p in profiles]  # fmt: skip
    header = ["dataset", "experiment", "method", "batch size", "steps", "s/step", "s/epoch", "peak memory (MiB)",
              "memory kind", "device"]  # fmt: skip
    table = [[r["dataset"], r["experiment"], (labels or {}).get(r["experiment"], r["method"]), r["batch_size"],
              r["steps"], r["seconds_per_step"], r["seconds_per_epoch"], r["peak_memory_bytes"] / 2**20,
              r["peak_memory_kind"], r["device"]] for r in rows]  # fmt: skip
    table.sort(key=lambda t: (t[0], t[1], t[3]))
    _write_csv(out / "time_memory_by_batch_size.csv", header, table)
    plots.batch_size_plot(out / "time_memory_by_batch_size.png", table)
    summary = {"profiles": len(rows), "plots": ["time_memory_by_batch_size.png"]}
    atomic_json(out / "summary.json", summary)
    return summary
