"""Optional run tracking in MLflow (config.yaml's ``tracking:``; off by default).

A finished training run logs its settings as params, each epoch's loss and validation
metrics (step = epoch), its final valid and test metrics, its dataset, experiment, run,
grid point and seed as tags, and its metrics.json, efficiency.json and gates.json as
artifacts; a report logs its tables and plots. Everything is read from the files the run
wrote, after it finished, so a resumed run is logged once and tracking never changes a
result. A local ``sqlite:///path.db`` store works offline.

The workflow hands the settings to its jobs in the ``IISAN_TRACKING`` environment
variable (JSON), so turning tracking on or off reruns nothing. A tracking failure (a
server down, a locked database) is a warning: the run's own files are the record.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from iisan.core.schema import parse, setting

log = logging.getLogger(__name__)

ENV = "IISAN_TRACKING"


@dataclass
class TrackingSettings:
    """Where runs are tracked (config.yaml's ``tracking:``)."""

    uri: str | None = setting(None, "an MLflow tracking URI, e.g. sqlite:///results/mlflow.db; null: off")
    experiment: str = setting("iisan", "the MLflow experiment runs are logged to")
    artifacts: str | None = setting(None, "where a new experiment keeps artifacts (default: MLflow's, ./mlruns)")


def from_env() -> TrackingSettings | None:
    """The settings the workflow passed, or None when tracking is off."""
    raw = os.environ.get(ENV, "")
    if not raw:
        return None
    s = parse(TrackingSettings, json.loads(raw), ENV)
    return s if s.uri else None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _metric_name(key: str) -> str:
    return key.replace("@", "_at_")  # MLflow keys: alphanumerics, _ - . / and spaces


def _start(settings: TrackingSettings, run_name: str):
    import mlflow

    mlflow.set_tracking_uri(settings.uri)
    if mlflow.get_experiment_by_name(settings.experiment) is None:
        mlflow.create_experiment(settings.experiment, artifact_location=settings.artifacts and
                                 Path(settings.artifacts).resolve().as_uri())  # fmt: skip
    mlflow.set_experiment(settings.experiment)
    return mlflow, mlflow.start_run(run_name=run_name)


def track_run(run_dir, tags: dict, settings: TrackingSettings | None = None) -> str | None:
    """Log a finished training run (its folder) to MLflow; the MLflow run id, or None if off or failed."""
    settings = settings or from_env()
    if settings is None:
        return None
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        mlflow, active = _start(settings, tags.get("run") or run_dir.name)
        with active:
            labels = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v) for k, v in tags.items()}
            mlflow.set_tags(labels | {"iisan.kind": "train", "iisan.folder": str(run_dir)})
            mlflow.log_params({k: str(v) for k, v in _flat(metrics["config"]).items()})
            for entry in metrics.get("history", []):
                step = {_metric_name(k): float(v) for k, v in entry.items() if k != "epoch" and v is not None}
                mlflow.log_metrics(step, step=int(entry["epoch"]))
            final = {f"{split}_{_metric_name(k)}": float(v) for split in ("valid", "test")
                     for k, v in metrics[split].items()}  # fmt: skip
            mlflow.log_metrics(final | {"best_epoch": float(metrics["best_epoch"])})
            for name in ("metrics.json", "efficiency.json", "gates.json"):
                if (run_dir / name).is_file():
                    mlflow.log_artifact(str(run_dir / name))
            return active.info.run_id
    except Exception as e:  # the run's files are the record; tracking must not fail it
        log.warning("tracking %s in %s failed (%s: %s); the run's own files are complete", run_dir, settings.uri,
                    type(e).__name__, e)  # fmt: skip
        return None


def track_report(out_dir, target: str, settings: TrackingSettings | None = None) -> str | None:
    """Log a report's tables and plots as one MLflow run (tag ``iisan.kind=report``)."""
    settings = settings or from_env()
    if settings is None:
        return None
    out_dir = Path(out_dir)
    try:
        mlflow, active = _start(settings, f"report/{target}")
        with active:
            mlflow.set_tags({"iisan.kind": "report", "target": target})
            mlflow.log_artifacts(str(out_dir))
            return active.info.run_id
    except Exception as e:
        log.warning("tracking the report %s in %s failed (%s: %s)", out_dir, settings.uri, type(e).__name__, e)
        return None
