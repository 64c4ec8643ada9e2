"""Results: ``iisan aggregate`` and ``iisan report``."""

from __future__ import annotations

import json
from pathlib import Path

from iisan.cli.common import json_arg


def cmd_aggregate(a):
    from iisan.results.aggregate import aggregate

    m = aggregate(json_arg(a.runs, "runs"), a.out)
    print(json.dumps({"selected": m["selected_point"], "valid": m["valid"], "test": m["test"], "sd": m["sd"]}))


def cmd_report(a):
    from iisan.results.report import build_profile_report, build_report

    experiments = json_arg(a.experiments, "experiments") if a.experiments else None
    if a.profiles:
        labels = {e: d.get("label", e) for exps in (experiments or {}).values() for e, d in exps.items()}
        build_profile_report(json_arg(a.profiles, "profiles"), a.out, labels)
    else:
        from iisan.core.tracking import track_report

        metrics = json_arg(a.metrics, "metrics") if a.metrics else None
        build_report(a.results, a.out, experiments=experiments, metrics=metrics)
        track_report(a.out, Path(a.out).name)  # when config.yaml's tracking is on


def add_commands(sub) -> None:
    s = sub.add_parser("aggregate", help="an experiment's runs (seeds x grid points) -> its metrics.json")
    s.add_argument("--runs", required=True,
                   help='JSON (inline or @file): [{"dir": run folder, "point": {...}, "seed": n}]')  # fmt: skip
    s.add_argument("--out", required=True, help="the experiment folder")
    s.set_defaults(func=cmd_aggregate)

    s = sub.add_parser("report", help="collect metrics/efficiency into tables and plots")
    s.add_argument("--results", required=True, help="results/{dataset} folders' parent, e.g. results/")
    s.add_argument("--experiments", help="JSON: {dataset: {experiment: {group, label, ...}}} to order and label rows")
    s.add_argument("--profiles", help="JSON list of `iisan profile` outputs: a time-and-memory-by-batch-size report")
    s.add_argument(
        "--metrics",
        help='JSON: {"names": [HR, Recall, NDCG, MRR, Coverage, PopPercentile], '
        '"at": [k, ...]} (default: HR and NDCG at the runs\' metric_k)',
    )
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_report)
