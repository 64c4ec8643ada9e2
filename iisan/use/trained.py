"""A trained run rebuilt from its folder alone: its ``model.pt`` carries the model
config, the identities of its inputs and where they were (``iisan.train.checkpoint``);
the model is built by the same ``iisan.train.model.build`` as in training, and inputs
whose identity has changed since are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from iisan.core.device import resolve_device
from iisan.core.errors import CacheMismatchError, CheckpointError
from iisan.data.prepared import PreparedData
from iisan.train import methods
from iisan.train.checkpoint import FORMAT, data_identity
from iisan.train.model import Inputs, ItemSources, build
from iisan.train.settings import model_config_from_dict


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


def _checkpoint(run: Path) -> dict:
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
    return ckpt


def _same_dataset(path: Path, ckpt: dict, data: PreparedData) -> None:
    got = data_identity(data)
    want = {k: ckpt["dataset"].get(k) for k in got}
    if got != want or data.asins[1:] != ckpt["items"]:
        diff = sorted(k for k in got if got[k] != want[k]) or ["the item table"]
        raise CheckpointError(f"{path} was trained on another dataset than {data.root} ({', '.join(diff)} differ)\n"
                              f"  fix: give the prepared dataset the run was trained on (--data)")  # fmt: skip


def _same_inputs(run: Path, ckpt: dict, sources: ItemSources) -> None:
    for modality, want in ckpt["identities"].items():
        got = sources.identities.get(modality, {})
        diff = sorted(k for k in set(want) | set(got) if k != "store" and got.get(k) != want.get(k))
        if diff:
            raise CacheMismatchError(
                f"the {modality} input of {run} is not the one it was trained on ({', '.join(diff)} differ)\n"
                "  fix: give the cache or backbone the run was trained with"
            )


def load_run(run_dir, *, data_dir=None, caches: dict | None = None, device="cpu", residency: str = "auto"):
    """Rebuild a trained recommender from its folder alone: ``(model, data, checkpoint)``.

    ``data_dir`` and ``caches`` (modality -> store) default to where the run read
    them; whatever is used must have the identities the checkpoint recorded."""
    run = resolve_run(run_dir)
    ckpt = _checkpoint(run)
    data = PreparedData.load(data_dir or ckpt["dataset"]["root"])
    _same_dataset(run / "model.pt", ckpt, data)
    mc, inputs, dev = (
        model_config_from_dict(ckpt["config"]),
        Inputs.from_record(ckpt["inputs"], caches),
        resolve_device(device),
    )
    # the inputs' identities are checked before the model is shaped from them: a cache of other layers
    # is named as such, not as a shape the model refuses
    sources = methods.get(mc.method).open(data, inputs, dev, residency)
    _same_inputs(run, ckpt, sources)
    model = build(mc, data, inputs, dev, residency, sources=sources)
    if dataclasses.asdict(model.cfg) != ckpt["config"]:
        raise CheckpointError(f"{run / 'model.pt'}: the inputs give a model of another shape than the checkpoint's")
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), data, ckpt
