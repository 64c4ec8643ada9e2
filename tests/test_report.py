"""Report: tables from finished runs, a note (not a crash) for missing ones."""

import csv

from iisan.results.report import build_report

from conftest import fit


def test_report_tables_plots_and_missing_note(small_demo, tmp_path):
    _, data_dir = small_demo
    results = tmp_path / "results"
    fit(data_dir, results / "demo/popularity", method="pop")
    fit(data_dir, results / "demo/sasrec_id", method="id", epochs=1)
    exps = {
        "demo": {
            "popularity": {"group": "baseline", "label": "popularity"},
            "sasrec_id": {"group": "baseline", "label": "SASRec (ID)"},
            "vs_tiny": {"group": "main", "label": "IISAN-VS"},
        }
    }
    summary = build_report(results, tmp_path / "report", experiments=exps)
    assert summary["runs"] == 2 and summary["missing"] == ["demo/vs_tiny"]
    main = (tmp_path / "report/main.md").read_text()
    assert (
        "| demo | sasrec_id | SASRec (ID) |" in main and "Missing (not run or failed), left out: demo/vs_tiny" in main
    )
    rows = list(csv.DictReader((tmp_path / "report/main.csv").read_text().splitlines()))
    pop = next(r for r in rows if r["experiment"] == "popularity")
    import json

    m = json.loads((results / "demo/popularity/metrics.json").read_text())
    assert float(pop["test HR@10 (%)"]) == 100 * m["test"]["HR@10"]
    eff = (tmp_path / "report/efficiency.md").read_text()
    assert "sasrec_id" in eff and "| popularity |" not in eff  # nothing to time for popularity
    assert (tmp_path / "report/time_memory_by_method.png").stat().st_size > 1000
