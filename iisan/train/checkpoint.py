"""What a run saves: the resume state after each epoch, and the final checkpoint.

``model.pt`` describes itself: the model config (with the shapes it was built
with), the identities of the inputs it reads (cache attributes or backbone
identities, layer indices, input fingerprints), where they were, the item table
(id -> ASIN), the dataset's fingerprints and the code hash, so that
``iisan.use.trained.load_run`` rebuilds the recommender from it alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from iisan import __version__
from iisan.core.outputs import atomic_file
from iisan.core.provenance import code_hash
from iisan.data.prepared import PreparedData

log = logging.getLogger(__name__)

FORMAT = 1


def data_identity(data: PreparedData) -> dict:
    """What identifies a prepared dataset's items and sequences."""
    keys = ("n_items", "n_users", "n_interactions", "max_seq_len", "min_seq_len", "text_fingerprint",
            "image_fingerprint", "sequences_fingerprint")  # fmt: skip
    return {k: data.meta.get(k) for k in keys}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(model, tc, data: PreparedData) -> str:
    """What must match for a saved training state to continue this run."""
    return _digest({"model": dataclasses.asdict(model.cfg), "train": dataclasses.asdict(tc),
                    "data": data_identity(data), "inputs": model.sources.identities,
                    "code": code_hash("train", model.method)})  # fmt: skip


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


def payload(model, tc, data: PreparedData, inputs, epoch: int) -> dict:
    """The self-describing checkpoint saved as model.pt (``inputs``: an ``iisan.train.model.Inputs``)."""
    return {
        "format": FORMAT,
        "iisan": __version__,
        "config": dataclasses.asdict(model.cfg),
        "train_config": dataclasses.asdict(tc),
        "state_dict": model.state_dict(),
        "epoch": epoch,
        "inputs": inputs.record(),
        "identities": model.sources.identities,
        "dataset": {"root": str(Path(data.root).resolve()), **data_identity(data)},
        "items": data.asins[1:],
        "code": code_hash("train", model.method),
    }
