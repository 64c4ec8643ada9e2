"""What a run saves: the resume state after each epoch, and the final checkpoint.

``model.pt`` describes itself: the model config (with the shapes it was built
with), the identities of the inputs it reads (cache attributes or backbone
identities, layer indices, input fingerprints), where they were, the item table
(id -> ASIN), the dataset's fingerprints and the code hash. ``load_run`` rebuilds
the recommender from it alone, refusing inputs whose identity has changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from iisan import __version__
from iisan.data import PreparedData
from iisan.errors import CacheMismatchError, CheckpointError
from iisan.outputs import atomic_file
from iisan.provenance import code_hash

log = logging.getLogger(__name__)

FORMAT = 1


def data_identity(data: PreparedData) -> dict:
    """What identifies a prepared dataset's items and sequences."""
    keys = ("n_items", "n_users", "n_interactions", "max_seq_len", "min_seq_len", "text_fingerprint",
            "image_fingerprint", "sequences_fingerprint")  # fmt: skip
    return {k: data.meta.get(k) for k in keys}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(mc, tc, data: PreparedData, sources) -> str:
    """What must match for a saved training state to continue this run."""
    return _digest({"model": dataclasses.asdict(mc), "train": dataclasses.asdict(tc), "data": data_identity(data),
                    "inputs": sources.identities, "code": code_hash("train", mc.method)})  # fmt: skip


def save_resume(path: Path, run_id: str, model, opt, rng: dict, state: dict) -> None:
    blob = {"run": run_id, "model": model.state_dict(), "optimizer": opt.state_dict() if opt else None,
            "rng": rng, "state": state}  # fmt: skip
    atomic_file(path, lambda f: torch.save(blob, f))


def load_resume(path: Path, run_id: str) -> dict | None:
    """The saved state of this very run, or None (a state of another run is discarded)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: start over rather than fail
        log.warning("ignoring unreadable training state %s (%s); starting from epoch 1", path, e)
        return None
    if blob.get("run") != run_id:
        log.warning("%s belongs to a run with other settings, inputs or code; starting from epoch 1", path)
        return None
    return blob


def payload(model, tc, data: PreparedData, sources, inputs: dict, epoch: int) -> dict:
    """The self-describing checkpoint saved as model.pt."""
    return {
        "format": FORMAT,
        "iisan": __version__,
        "config": dataclasses.asdict(model.cfg),
        "train_config": dataclasses.asdict(tc),
        "state_dict": model.state_dict(),
        "epoch": epoch,
        "inputs": {
            "caches": {m: str(Path(p).resolve()) for m, p in inputs["caches"].items()},
            "backbones": {m: dataclasses.asdict(s) for m, s in inputs["backbones"].items()},
            "layers": inputs["layers"],
        },
        "identities": sources.identities,
        "dataset": {"root": str(Path(data.root).resolve()), **data_identity(data)},
        "items": data.asins[1:],
        "code": code_hash("train", model.cfg.method),
    }


def resolve_run(path) -> Path:
    """A run folder; for an experiment of several runs, the run its metrics.json selects
    (the best seed on validation HR@k of the selected grid point)."""
    path = Path(path)
    metrics = path / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        if m.get("aggregate"):
            k = m["metric_k"]
            best = max(m["per_seed"], key=lambda s: s["valid"][f"HR@{k}"])
            return path / best["run"]
    return path


def load_run(run_dir, *, data_dir=None, caches: dict | None = None, device="cpu"):
    """Rebuild a trained recommender from its folder alone: ``(model, data, checkpoint)``.

    ``data_dir`` and ``caches`` (modality -> store) default to where the run read
    them; whatever is used must have the identities the checkpoint recorded."""
    from iisan import methods
    from iisan.device import resolve_device
    from iisan.model import Recommender
    from iisan.settings import model_config_from_dict

    run = resolve_run(run_dir)
    path = run / "model.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{run} holds no trained model (no model.pt)\n"
            "  fix: train it first (`iisan train` or snakemake), or give the run's folder"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by iisan {ckpt.get('iisan', '< 0.2')} in another format\n"
                              f"  fix: retrain the run with this iisan")  # fmt: skip
    data = PreparedData.load(data_dir or ckpt["dataset"]["root"])
    got = data_identity(data)
    want = {k: ckpt["dataset"].get(k) for k in got}
    if got != want or data.asins[1:] != ckpt["items"]:
        diff = sorted(k for k in got if got[k] != want[k]) or ["the item table"]
        raise CheckpointError(f"{path} was trained on another dataset than {data.root} ({', '.join(diff)} differ)\n"
                              f"  fix: give the prepared dataset the run was trained on (--data)")  # fmt: skip
    inputs = ckpt["inputs"]
    caches = {**inputs["caches"], **(caches or {})}
    cfg = model_config_from_dict(ckpt["config"])
    method = methods.get(cfg.method)
    device = resolve_device(device)
    sources = methods.load(method.sources)(data, device, method=method, caches=caches, backbones=inputs["backbones"],
                                           layers=inputs["layers"])  # fmt: skip
    for modality, want_id in ckpt["identities"].items():
        got_id = sources.identities.get(modality, {})
        diff = sorted(k for k in set(want_id) | set(got_id) if k != "store" and got_id.get(k) != want_id.get(k))
        if diff:
            raise CacheMismatchError(
                f"the {modality} input of {run} is not the one it was trained on ({', '.join(diff)} differ)\n"
                "  fix: give the cache or backbone the run was trained with"
            )
    model = Recommender(dataclasses.replace(cfg, peft=dict(cfg.peft)), sources).to(device)
    if dataclasses.asdict(model.cfg) != ckpt["config"]:
        raise CheckpointError(f"{path}: the inputs give a model of another shape than the checkpoint's")
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), data, ckpt
