"""Optional MLflow tracking: a finished run and a report read back with MLflow's own client."""

import json

import pytest

from conftest import QUICK, fit, iisan


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {"uri": uri, "experiment": "iisan-test", "artifacts": str(tmp_path / "mlruns")}
    monkeypatch.setenv("IISAN_TRACKING", json.dumps(settings))
    return uri


def test_a_finished_run_and_a_report_are_tracked(small_demo, caches, tmp_path, store):
    from mlflow.tracking import MlflowClient

    _, data_dir = small_demo
    tags = {"dataset": "demo", "experiment": "vs", "run": "lr-0.002_seed-3", "point": {"lr": 0.002}, "seed": 3}
    args = ["train", "--data", data_dir, "--text-cache", caches["text"], "--image-cache", caches["image"],
            "--settings", json.dumps({**QUICK, "epochs": 2, "seed": 3}), "--name", "vs", "--tags", json.dumps(tags),
            "--out", tmp_path / "results/demo/vs"]  # fmt: skip
    r = iisan(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "results/demo/vs/metrics.json").read_text())
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("iisan-test")
    (run,) = client.search_runs([exp.experiment_id], "tags.`iisan.kind` = 'train'")
    assert run.data.tags["seed"] == "3" and json.loads(run.data.tags["point"]) == {"lr": 0.002}
    assert run.data.tags["run"] == "lr-0.002_seed-3" and run.info.run_name == "lr-0.002_seed-3"
    assert run.data.params["lr"] == "0.002" and run.data.params["seed"] == "3"
    assert run.data.metrics["test_HR_at_10"] == pytest.approx(m["test"]["HR@10"])
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [x.step for x in losses] == [h["epoch"] for h in m["history"]]
    assert [x.value for x in losses] == pytest.approx([h["loss"] for h in m["history"]])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "efficiency.json", "gates.json"} <= artifacts
    assert str(tmp_path / "mlruns") in run.info.artifact_uri  # the experiment's own artifact folder
    r = iisan("report", "--results", tmp_path / "results", "--out", tmp_path / "report/demo")
    assert r.returncode == 0, r.stderr[-3000:]
    (rep,) = client.search_runs([exp.experiment_id], "tags.`iisan.kind` = 'report'")
    assert rep.info.run_name == "report/demo" and "main.md" in {a.path for a in client.list_artifacts(rep.info.run_id)}


def test_tracking_off_or_broken_never_fails_a_run(small_demo, tmp_path, monkeypatch, caplog):
    from iisan.core.tracking import track_run

    _, data_dir = small_demo
    fit(data_dir, tmp_path / "pop", method="pop")
    monkeypatch.delenv("IISAN_TRACKING", raising=False)
    assert track_run(tmp_path / "pop", {}) is None  # off by default
    monkeypatch.setenv("IISAN_TRACKING", json.dumps({"uri": "nosuch://tracking"}))  # no store answers
    assert track_run(tmp_path / "pop", {"run": "pop"}) is None
    assert "the run's own files are complete" in caplog.text
