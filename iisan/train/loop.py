"""Stage two: fit a method's recommender, early-stop on valid HR@k, rank all items.

The loop never asks which method it trains: the registry (iisan/train/methods.py)
says what a method reads, and the model (iisan/train/model.py) gives the same few
calls for every one. Cached methods hold every item's selected layers in memory
(on the accelerator when present); a step encodes only the batch's unique items.

A run folder is consistent at every instant: at the start the previous run's
outputs go (metrics.json first: its presence means "finished"), and the new
ones are published at the end (metrics.json last). After every epoch the full
training state (weights, optimizer, random generators, history) is saved to
``resume.pt``; a killed or preempted run started again with the same inputs
and settings continues from its last finished epoch and ends with exactly the
metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iisan.core.device import deterministic, resolve_device
from iisan.core.errors import TrainingError
from iisan.core.measure import PeakMemory, Stopwatch, count_parameters
from iisan.core.outputs import atomic_file, atomic_json, claim_folder
from iisan.data.prepared import PreparedData
from iisan.train import checkpoint
from iisan.train.loss import debiased_in_batch_ce
from iisan.train.metrics import USER_BLOCK, hr_ndcg, rank_of_target, top_k
from iisan.train.model import Inputs, Recommender, build, item_embeddings, user_embeddings
from iisan.train.settings import ModelConfig, TrainConfig, settings

log = logging.getLogger(__name__)

# published at the end, in this order (metrics.json last); removed at the start, metrics.json first
OUTPUTS = ("model.pt", "gates.json", "ranks.npz", "topk.npz", "efficiency.json", "metrics.json")
RESUME = "resume.pt"  # the training state after the last finished epoch
LOG = "train.log"


@torch.no_grad()
def rank_all(model: Recommender, inputs, targets, history, batch: int, items=None, users=None) -> torch.Tensor:
    """0-based rank of each user's target among all items (history excluded): the items encoded
    ``batch`` at a time, then users ``batch`` at a time (unless given: ``items`` (N+1, d), ``users``
    (U, d) in the encoder's dtype) ranked in blocks (iisan.train.metrics)."""
    items = item_embeddings(model, batch, float32=False) if items is None else items
    ranks = []
    for i in range(0, len(inputs), batch):
        u = user_embeddings(model, inputs[i : i + batch], batch, float32=False, items=items) if users is None \
            else users[i : i + batch]  # fmt: skip
        for j in range(0, len(u), USER_BLOCK):  # scores of at most USER_BLOCK users at a time
            sl = slice(i + j, i + j + USER_BLOCK)
            ranks.append(rank_of_target(u[j : j + USER_BLOCK], items, targets[sl], history[sl]))
    return torch.cat(ranks)


def evaluate(model: Recommender, inputs, targets, history, batch: int, k: int) -> dict:
    """HR@k / NDCG@k of ranking every item for each user (history excluded)."""
    return hr_ndcg(rank_all(model, inputs, targets, history, batch), k)


def _ours(path: Path) -> bool:
    """A run file iisan wrote (a metrics.json must be iisan's: a user's file of that name is not)."""
    if path.name != "metrics.json":
        return True
    try:
        return {"valid", "test", "dataset"} <= set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return False


def _on_cpu(state: dict) -> dict:
    """A copy of a state dict in host memory (the best epoch's weights must not hold accelerator memory)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _rng_state(rng: np.random.Generator) -> dict:
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(data_dir, out_dir, mc: ModelConfig, tc: TrainConfig, inputs: Inputs | None = None, *,
          extra_meta: dict | None = None) -> dict:  # fmt: skip
    """Train, early-stop on valid HR@k, and publish model.pt, gates.json, ranks.npz,
    efficiency.json and metrics.json in ``out_dir``. Returns the metrics."""
    out = Path(out_dir)
    claim_folder(out, "run", allowed=(*OUTPUTS, RESUME, LOG), recognise=_ours)
    for name in reversed(OUTPUTS):  # metrics.json first: from now on the folder holds no finished run
        (out / name).unlink(missing_ok=True)
    with deterministic(resolve_device(tc.device)):
        s = setup(data_dir, mc, tc, inputs or Inputs())
        state = _fit(s, tc, out)
        metrics = _publish(s, tc, out, inputs or Inputs(), state, extra_meta)
    (out / RESUME).unlink(missing_ok=True)
    return metrics


@dataclass
class Session:
    """Everything a training loop needs, built once (also timed by iisan.train.profiling)."""

    device: torch.device
    data: PreparedData
    splits: dict  # the leave-one-out arrays as tensors on the device
    model: Recommender
    opt: torch.optim.Optimizer | None  # None: nothing to fit
    log_pop: torch.Tensor  # (N+1,) log popularity, for the debiased loss
    train_seqs: torch.Tensor  # (U, L+1) users with at least one (input, target) pair


def setup(data_dir, mc: ModelConfig, tc: TrainConfig, inputs: Inputs) -> Session:
    """Seed, load the data and the method's inputs, build the model and its optimizer."""
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    data = PreparedData.load(data_dir)
    sp = {k: torch.as_tensor(v, device=device) for k, v in data.splits.items()}
    model = build(mc, data, inputs, device, tc.residency)
    groups = model.param_groups(tc)
    opt = torch.optim.Adam(groups, weight_decay=tc.weight_decay) if groups else None
    log_pop = torch.log(torch.as_tensor(data.popularity, dtype=torch.float32, device=device).clamp_min(1e-12))
    train_seqs = sp["train"][(sp["train"] != 0).sum(1) >= 2]
    return Session(device, data, sp, model, opt, log_pop, train_seqs)


def step(s: Session, seqs: torch.Tensor) -> torch.Tensor:
    """One optimisation step on a batch of sequences (B, L+1); returns the loss."""
    slots = s.model.embed_slots(seqs)  # (B, L+1, d)
    user = s.model.seq(slots[:, :-1], seqs[:, :-1] != 0)  # (B, L, d)
    loss = debiased_in_batch_ce(user, slots, seqs, s.log_pop)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    s.opt.step()
    return loss.detach()


def _valid(s: Session, tc: TrainConfig) -> dict:
    sp = s.splits
    return evaluate(s.model, sp["valid_input"], sp["valid_target"], sp["valid_history"], tc.eval_batch_size,
                    tc.metric_k)  # fmt: skip


def _epoch(s: Session, tc: TrainConfig, rng: np.random.Generator, epoch: int, watch, peak) -> float:
    """One pass over the training users in a random order; returns the mean loss."""
    s.model.train()
    order = torch.as_tensor(rng.permutation(len(s.train_seqs)), device=s.device)
    n_batches = math.ceil(len(s.train_seqs) / tc.batch_size)
    losses = []
    with peak, watch:
        for b in tqdm(range(n_batches), desc=f"epoch {epoch}", unit="batch", leave=False, disable=None):
            losses.append(step(s, s.train_seqs[order[b * tc.batch_size : (b + 1) * tc.batch_size]]))
    mean_loss = torch.stack(losses).mean().item()
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"the training loss became {mean_loss} in epoch {epoch} (lr={tc.lr}, lr_san={tc.lr_san})\n"
            "  fix: lower `lr` and `lr_san` in the train settings"
        )
    return mean_loss


def _fit(s: Session, tc: TrainConfig, out: Path) -> dict:
    """Epochs until the budget or early stop, saving the training state after each; returns it."""
    rng = np.random.default_rng(tc.seed)
    k, model = tc.metric_k, s.model
    run_id = checkpoint.run_identity(model, tc, s.data)
    params = count_parameters(model, *model.sources.frozen_modules())
    log.info("%s: %d users, %d items, %s trainable parameters, device %s", model.method.name, len(s.train_seqs),
             s.data.n_items, f"{params['trainable_parameters']:,}", s.device)  # fmt: skip
    state = {"epoch": 0, "best_valid": None, "best_epoch": 0, "best_state": None, "bad_evals": 0,
             "history": [], "epoch_seconds": [], "peak_bytes": 0}  # fmt: skip
    resumed = checkpoint.load_resume(out / RESUME, run_id)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        s.opt.load_state_dict(resumed["optimizer"])
        _set_rng_state(rng, resumed["rng"])
        state = resumed["state"]
        log.info("resuming after epoch %d (from %s)", state["epoch"], out / RESUME)
    watch, peak = Stopwatch(s.device), PeakMemory(s.device)  # both cover training steps only, not evaluation
    peak.peak_bytes = state["peak_bytes"]
    last = tc.epochs if model.method.trains else 0
    first = last + 1 if state.get("stopped") else state["epoch"] + 1  # killed after its early stop: nothing to redo
    for epoch in range(first, last + 1):
        t_epoch = watch.seconds
        mean_loss = _epoch(s, tc, rng, epoch, watch, peak)
        state["epoch_seconds"].append(watch.seconds - t_epoch)
        entry = {"epoch": epoch, "loss": mean_loss, "train_seconds": state["epoch_seconds"][-1]}
        if epoch % tc.eval_every == 0 or epoch == last:
            t_eval = time.perf_counter()
            valid = _valid(s, tc)
            improved = state["best_valid"] is None or valid[f"HR@{k}"] > state["best_valid"][f"HR@{k}"]
            if improved:
                state.update(best_valid=valid, best_epoch=epoch, best_state=_on_cpu(model.state_dict()))
            state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
            entry.update({f"valid_{key}": v for key, v in valid.items()}, eval_seconds=time.perf_counter() - t_eval)
            hr, ndcg, mark = valid[f"HR@{k}"], valid[f"NDCG@{k}"], "  *" if improved else ""
            log.info("epoch %3d  loss %.4f  valid HR@%d %.4f  NDCG@%d %.4f  train %.1fs  eval %.1fs%s", epoch,
                     mean_loss, k, hr, k, ndcg, entry["train_seconds"], entry["eval_seconds"], mark)  # fmt: skip
            if state["bad_evals"] >= tc.patience:
                log.info("early stop: no better valid HR@%d in %d evaluations", k, tc.patience)
                state["stopped"] = True
        else:
            log.info("epoch %3d  loss %.4f  train %.1fs", epoch, mean_loss, entry["train_seconds"])
        state["history"].append(entry)
        state["epoch"], state["peak_bytes"] = epoch, peak.peak_bytes
        checkpoint.save_resume(out / RESUME, run_id, model, s.opt, _rng_state(rng), state)
        if state.get("stopped"):
            break
    state["params"], state["peak_kind"] = params, peak.kind
    return state


def _publish(s: Session, tc: TrainConfig, out: Path, inputs: Inputs, state: dict, extra_meta) -> dict:
    """The best epoch's model ranked on valid and test; every output written, metrics.json last."""
    model, sp, k = s.model, s.splits, tc.metric_k
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    else:  # nothing to fit: evaluate as built
        state["best_valid"] = _valid(s, tc)
    items = item_embeddings(model, tc.eval_batch_size, float32=False)  # one pass over the catalogue for all below
    valid_ranks = rank_all(model, sp["valid_input"], sp["valid_target"], sp["valid_history"], tc.eval_batch_size, items)
    test_users = user_embeddings(model, sp["test_input"], tc.eval_batch_size, float32=False, items=items)
    test_ranks = rank_all(model, sp["test_input"], sp["test_target"], sp["test_history"], tc.eval_batch_size, items,
                          test_users)  # fmt: skip
    test = hr_ndcg(test_ranks, k)
    log.info("best epoch %d: valid %s  test %s", state["best_epoch"], state["best_valid"], test)
    metrics = {
        "valid": state["best_valid"],
        "test": test,
        "best_epoch": state["best_epoch"],
        "epochs_run": len(state["history"]),
        "seed": tc.seed,
        "metric_k": k,
        "config": settings(model.cfg, tc),
        "model_config": asdict(model.cfg),
        "dataset": s.data.meta,
        "history": state["history"],
        "caches": model.sources.identities,
        **(extra_meta or {}),
    }
    secs = state["epoch_seconds"]
    efficiency = {
        "method": model.method.name,
        "seconds_per_epoch": float(np.mean(secs)) if secs else 0.0,
        "seconds_per_epoch_all": secs,
        "peak_memory_bytes": state["peak_bytes"],
        "peak_memory_kind": state["peak_kind"],
        "device": str(s.device),
        "batch_size": tc.batch_size,
        **state["params"],
    }
    ckpt = checkpoint.payload(model, tc, s.data, inputs, state["best_epoch"])
    atomic_file(out / "model.pt", lambda f: torch.save(ckpt, f))
    atomic_json(out / "gates.json", model.diagnostics())
    ranks = {"valid": valid_ranks.cpu().numpy().astype(np.int32), "test": test_ranks.cpu().numpy().astype(np.int32)}
    atomic_file(out / "ranks.npz", lambda f: np.savez(f, **ranks))
    # the test users' top-K lists (history excluded, as ranked) and the training popularity: what list
    # metrics (iisan.results.metrics) are computed from without the model
    _, top = top_k(test_users.float().cpu(), items.float().cpu(), sp["test_history"].cpu(), tc.keep_top)
    lists = {"test": top.numpy().astype(np.int32), "popularity": s.data.popularity}
    atomic_file(out / "topk.npz", lambda f: np.savez(f, **lists))
    atomic_json(out / "efficiency.json", efficiency)
    atomic_json(out / "metrics.json", metrics)  # last: its presence means the run finished
    return metrics
