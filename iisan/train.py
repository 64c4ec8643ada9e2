"""Stage two: fit a method's recommender, early-stop on valid HR@k, rank all items.

The loop never asks which method it trains: the registry (iisan/methods.py)
says what a method reads, and the model (iisan/model.py) gives the same few
calls for every one. Cached methods hold every item's selected layers in memory
(on the accelerator when present); a step encodes only the batch's unique items.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iisan import methods
from iisan.data import PreparedData
from iisan.device import resolve_device
from iisan.efficiency import PeakMemory, Stopwatch, count_parameters
from iisan.errors import TrainingError
from iisan.loss import debiased_in_batch_ce
from iisan.metrics import hr_ndcg, rank_of_target
from iisan.model import Recommender, build
from iisan.outputs import atomic_json, atomic_write
from iisan.settings import ModelConfig, TrainConfig, settings

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: Recommender, inputs, targets, history, batch: int, k: int) -> dict:
    """HR@k / NDCG@k of ranking every item for each user (history excluded)."""
    model.eval()
    n1 = model.cfg.n_items + 1
    all_ids = torch.arange(n1, device=inputs.device)
    items = torch.cat([model.embed_items(all_ids[i : i + batch]) for i in range(0, n1, batch)])  # (N+1, d)
    ranks = []
    for i in range(0, len(inputs), batch):
        u = model.users(inputs[i : i + batch])  # (U, d)
        ranks.append(rank_of_target(u @ items.T, targets[i : i + batch], history[i : i + batch]))
    return hr_ndcg(torch.cat(ranks), k)


def _save(path: Path, obj) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def open_sources(mc: ModelConfig, data: PreparedData, device, caches=None, backbones=None, layers=None):
    """What the method's item encoder reads, opened by the registry's builder."""
    method = methods.get(mc.method)
    return methods.load(method.sources)(data, device, method=method, caches=caches, backbones=backbones, layers=layers)


def train(
    data_dir,
    out_dir,
    mc: ModelConfig,
    tc: TrainConfig,
    *,
    caches: dict | None = None,
    backbones: dict | None = None,
    layers: dict | None = None,
    extra_meta: dict | None = None,
) -> dict:
    """Train, early-stop on valid HR@k, and write metrics.json, model.pt,
    efficiency.json and gates.json into ``out_dir``. Returns the metrics.

    ``caches``: modality -> Zarr store (cached methods); ``backbones``: modality ->
    BackboneSpec and ``layers``: modality -> layer spec (methods that run backbones)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = methods.get(mc.method)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    device = resolve_device(tc.device)
    data = PreparedData.load(data_dir)
    sp = {k: torch.as_tensor(v, device=device) for k, v in data.splits.items()}
    sources = open_sources(mc, data, device, caches, backbones, layers)
    model = build(mc, sources).to(device)
    mc = model.cfg  # with the derived fields filled in
    k = tc.metric_k
    log_pop = torch.log(torch.as_tensor(data.popularity, dtype=torch.float32, device=device).clamp_min(1e-12))

    groups = model.param_groups(tc)
    opt = torch.optim.Adam(groups, weight_decay=tc.weight_decay) if groups else None
    train_seqs = sp["train"]
    train_seqs = train_seqs[(train_seqs != 0).sum(1) >= 2]  # at least one (input, target) pair
    n_batches = math.ceil(len(train_seqs) / tc.batch_size)
    params = count_parameters(model, *sources.frozen_modules())
    log.info(
        "%s: %d users, %d items, %s trainable parameters, device %s",
        mc.method,
        len(train_seqs),
        data.n_items,
        f"{params['trainable_parameters']:,}",
        device,
    )

    best = {"valid": None, "epoch": 0, "state": None}
    history, epoch_seconds = [], []
    watch, peak = Stopwatch(device), PeakMemory(device)  # both cover training steps only, not evaluation
    for epoch in range(1, tc.epochs + 1 if method.trains else 1):
        model.train()
        order = torch.as_tensor(rng.permutation(len(train_seqs)), device=device)
        losses = []
        t_epoch = watch.seconds
        with peak, watch:
            for b in tqdm(range(n_batches), desc=f"epoch {epoch}", unit="batch", leave=False, disable=None):
                seqs = train_seqs[order[b * tc.batch_size : (b + 1) * tc.batch_size]]  # (B, L+1)
                slots = model.embed_slots(seqs)  # (B, L+1, d)
                user = model.seq(slots[:, :-1], seqs[:, :-1] != 0)  # (B, L, d)
                loss = debiased_in_batch_ce(user, slots, seqs, log_pop)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        epoch_seconds.append(watch.seconds - t_epoch)
        t_eval = time.perf_counter()
        valid = evaluate(model, sp["valid_input"], sp["valid_target"], sp["valid_history"], tc.eval_batch_size, k)
        mean_loss = torch.stack(losses).mean().item()
        if not math.isfinite(mean_loss):
            raise TrainingError(f"training loss became {mean_loss} at epoch {epoch}\n  fix: lower `lr` / `lr_san`")
        hr = valid[f"HR@{k}"]
        improved = best["valid"] is None or hr > best["valid"][f"HR@{k}"]
        if improved:
            best = {"valid": valid, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            _save(
                out / "model.pt",
                {"state_dict": best["state"], "config": asdict(mc), "train_config": asdict(tc), "epoch": epoch},
            )
        history.append(
            {
                "epoch": epoch,
                "loss": mean_loss,
                **{f"valid_{key}": v for key, v in valid.items()},
                "train_seconds": epoch_seconds[-1],
                "eval_seconds": time.perf_counter() - t_eval,
            }
        )
        log.info(
            "epoch %3d  loss %.4f  valid HR@%d %.4f  NDCG@%d %.4f  %.1fs%s",
            epoch,
            mean_loss,
            k,
            hr,
            k,
            valid[f"NDCG@{k}"],
            epoch_seconds[-1],
            "  *" if improved else "",
        )
        if epoch - best["epoch"] >= tc.patience:
            log.info("early stop: no better valid HR@%d for %d epochs", k, tc.patience)
            break

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    else:  # nothing to fit: evaluate as built
        best["valid"] = evaluate(
            model, sp["valid_input"], sp["valid_target"], sp["valid_history"], tc.eval_batch_size, k
        )
        _save(
            out / "model.pt",
            {"state_dict": model.state_dict(), "config": asdict(mc), "train_config": asdict(tc), "epoch": 0},
        )
    test = evaluate(model, sp["test_input"], sp["test_target"], sp["test_history"], tc.eval_batch_size, k)
    log.info("best epoch %d: valid %s  test %s", best["epoch"], best["valid"], test)
    metrics = {
        "valid": best["valid"],
        "test": test,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "seed": tc.seed,
        "metric_k": k,
        "config": settings(mc, tc),
        "model_config": asdict(mc),
        "dataset": data.meta,
        "history": history,
        "caches": sources.identities,
        **(extra_meta or {}),
    }
    efficiency = {
        "method": mc.method,
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
        "seconds_per_epoch_all": epoch_seconds,
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_kind": peak.kind,
        "device": str(device),
        "batch_size": tc.batch_size,
        **params,
    }
    atomic_json(out / "gates.json", model.diagnostics())
    atomic_json(out / "efficiency.json", efficiency)
    atomic_json(out / "metrics.json", metrics)  # last: its presence means the run finished
    return metrics
