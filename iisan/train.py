"""Stage two: train an item encoder + sequence encoder from the cache, rank all items.

Methods (``TrainConfig.method``):
- ``iisan``: SAN towers on cached hidden states (VS, VA or text-only by the caches given);
- ``frozen``: a Linear head on each modality's last cached layer (frozen-backbone anchor);
- ``id``: ID-based SASRec (no content);
- ``pop``: rank by training popularity (no training; the floor every model must beat);
- ``uncached``: IISAN with the frozen backbones run inside the loop (no cache);
- ``fft``, ``lora``, ``adapter``, ``bitfit``: embedded PEFT / full fine-tuning baselines.
The cached layers of every item sit in memory (on the accelerator when present);
a step runs the item encoder on the batch's unique item ids only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iisan import cache
from iisan.data import PreparedData
from iisan.efficiency import PeakMemory, Stopwatch, count_parameters
from iisan.errors import ConfigError
from iisan.loss import debiased_in_batch_ce
from iisan.metrics import hr_ndcg, rank_of_target
from iisan.san import FrozenItemEncoder, IDItemEncoder, SANConfig, SANItemEncoder
from iisan.seqenc import SequenceEncoder

log = logging.getLogger(__name__)

CACHED = ("iisan", "frozen")
LIVE = ("uncached", "fft", "lora", "adapter", "bitfit")  # need backbones, not caches
METHODS = CACHED + LIVE + ("id", "pop")


@dataclass
class TrainConfig:
    """Training settings; defaults are the authors' (method.md section 5)."""

    method: str = "iisan"
    d: int = 64  # embedding size of items and users
    bottleneck: int = 64  # SAN block hidden size
    intra: bool = True  # ablation: False = w/o intra towers
    inter: bool = True  # ablation: False = w/o inter tower
    learned_gates: bool = True  # ablation: False = gates fixed at 0.5
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.1
    lr: float = 2e-4  # sequence encoder, heads, fusion
    lr_san: float = 1e-4  # SAN blocks
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 100
    patience: int = 10  # early stop after this many epochs without a better valid HR@10
    seed: int = 12345
    eval_batch_size: int = 2048
    device: str = "auto"
    metric_k: int = 10

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"train `method`={self.method!r} must be one of {METHODS}")
        for name in ("d", "bottleneck", "batch_size", "epochs", "blocks", "heads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"train `{name}` must be a positive integer, got {getattr(self, name)!r}")
        if self.d % self.heads:
            raise ConfigError(f"train `d`={self.d} must be divisible by `heads`={self.heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s asked for but CUDA is not available; using the CPU", name)
        return torch.device("cpu")
    return torch.device(name)


class CachedFeatures:
    """All items' cached layers per modality, in memory; gathers rows by item id."""

    def __init__(self, data: PreparedData, text_store=None, image_store=None, device="cpu"):
        self.text = self.image = None
        self.attrs = {}
        for name, store in (("text", text_store), ("image", image_store)):
            if store is None:
                continue
            fp = data.meta["text_fingerprint" if name == "text" else "image_fingerprint"]
            tensor, attrs = cache.load(store, device, expect={"input_fingerprint": fp, "n_items": data.n_items, "modality": name})
            setattr(self, name, tensor)
            self.attrs[name] = attrs

    def __call__(self, ids):  # ids: (M,) -> (M, Kt, Wt) or None, (M, Kv, Wv) or None, as float32
        return tuple(None if t is None else t[ids].float() for t in (self.text, self.image))

    def shape(self, name):
        t = getattr(self, name)
        return (0, 0) if t is None else (t.shape[1], t.shape[2])


class Recommender(torch.nn.Module):
    """Item encoder + sequence encoder; scores users against items."""

    def __init__(self, cfg: TrainConfig, n_items: int, features, max_len: int, items: torch.nn.Module | None = None):
        super().__init__()
        self.features = features
        if items is not None:
            self.items = items
        elif cfg.method == "id":
            self.items = IDItemEncoder(n_items, cfg.d)
        else:
            (kt, wt), (kv, wv) = features.shape("text"), features.shape("image")
            scfg = SANConfig(d=cfg.d, bottleneck=cfg.bottleneck, text_taps=kt, text_width=wt, image_taps=kv,
                             image_width=wv, intra=cfg.intra, inter=cfg.inter, learned_gates=cfg.learned_gates)
            self.items = (FrozenItemEncoder if cfg.method == "frozen" else SANItemEncoder)(scfg)
        self.seq = SequenceEncoder(cfg.d, max_len, cfg.blocks, cfg.heads, cfg.dropout)

    def embed_items(self, ids: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, d)
        if self.features is None:  # ID embeddings, or an encoder that reads raw items itself
            return self.items(ids)
        return self.items(*self.features(ids))

    def embed_slots(self, seqs: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, d), padding = 0
        uniq, inv = torch.unique(seqs, return_inverse=True)  # encode each distinct item once
        e = self.embed_items(uniq)[inv]
        return e * (seqs != 0)[..., None]

    def users(self, inputs: torch.Tensor) -> torch.Tensor:  # (U, T) -> (U, d): state at the last position
        return self.seq(self.embed_slots(inputs), inputs != 0)[:, -1]


@torch.no_grad()
def evaluate(model: Recommender, n1: int, inputs, targets, history, batch: int, k: int, device) -> dict:
    model.eval()
    all_ids = torch.arange(n1, device=device)
    items = torch.cat([model.embed_items(all_ids[i:i + batch]) for i in range(0, n1, batch)])  # (N+1, d)
    ranks = []
    for i in range(0, len(inputs), batch):
        u = model.users(inputs[i:i + batch])
        ranks.append(rank_of_target(u @ items.T, targets[i:i + batch], history[i:i + batch]))
    return hr_ndcg(torch.cat(ranks), k)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _popularity(data: PreparedData, out: Path, cfg: TrainConfig, extra_meta) -> dict:
    sp = {k: torch.as_tensor(v) for k, v in data.splits.items()}
    pop = torch.as_tensor(data.popularity)

    def run(split):
        scores = pop.expand(len(sp[f"{split}_target"]), -1)
        return hr_ndcg(rank_of_target(scores, sp[f"{split}_target"], sp[f"{split}_history"]), cfg.metric_k)

    metrics = {"valid": run("valid"), "test": run("test"), "best_epoch": 0, "epochs_run": 0, "seed": cfg.seed,
               "config": asdict(cfg), "dataset": data.meta, "history": [], "caches": {}, **(extra_meta or {})}
    _atomic_json(out / "efficiency.json", {"method": "pop", "seconds_per_epoch": 0.0, "peak_memory_bytes": 0,
                                           "trainable_parameters": 0, "total_parameters": 0})
    _atomic_json(out / "metrics.json", metrics)
    return metrics


def _build(cfg: TrainConfig, data: PreparedData, device, text_cache, image_cache, backbones, layers, max_len):
    """The model for ``cfg.method`` and what it reads items from."""
    if cfg.method in CACHED:
        if text_cache is None and image_cache is None:
            raise ConfigError(f"method {cfg.method!r} needs a text and/or an image cache (--text-cache/--image-cache)")
        features = CachedFeatures(data, text_cache, image_cache, device)
        return Recommender(cfg, data.n_items, features, max_len), features
    if cfg.method in LIVE:
        from iisan.embedded import EmbeddedItemEncoder, LiveFeatures, load_backbones
        from iisan.layers import select_layers

        specs = {m: s for m, s in (backbones or {}).items() if s is not None}
        if cfg.method != "uncached":  # weights that train keep float32 masters (auto would pick bf16 on a GPU)
            specs = {m: dataclasses.replace(s, dtype="float32") if s.dtype == "auto" else s for m, s in specs.items()}
        if not specs:
            raise ConfigError(f"method {cfg.method!r} runs backbones in the loop: give --text-backbone and/or --image-backbone")
        loaded = load_backbones(specs, device)
        if cfg.method == "uncached":
            taps = {m: select_layers(b.info["n_layers"], (layers or {}).get(m) or {}) for m, b in loaded.items()}
            features = LiveFeatures(data, loaded, taps)
            return Recommender(cfg, data.n_items, features, max_len), features
        items = EmbeddedItemEncoder(data, loaded, cfg.method, cfg.d)
        return Recommender(cfg, data.n_items, None, max_len, items=items), None
    return Recommender(cfg, data.n_items, None, max_len), None


def train(data_dir, out_dir, cfg: TrainConfig, text_cache=None, image_cache=None, extra_meta: dict | None = None,
          backbones: dict | None = None, layers: dict | None = None) -> dict:
    """Train, early-stop on valid HR@10, and write metrics.json, model.pt,
    efficiency.json and gates.json into ``out_dir``. Returns the metrics.

    Cached methods read ``text_cache``/``image_cache`` (Zarr stores); live ones
    load ``backbones`` ({"text"|"image": BackboneSpec}) with ``layers`` specs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    data = PreparedData.load(data_dir)
    if cfg.method == "pop":
        return _popularity(data, out, cfg, extra_meta)
    sp = {k: torch.as_tensor(v, device=device) for k, v in data.splits.items()}
    max_len, n1 = sp["valid_input"].shape[1], data.n_items + 1
    model, features = _build(cfg, data, device, text_cache, image_cache, backbones, layers, max_len)
    model = model.to(device)
    log_pop = torch.log(torch.as_tensor(data.popularity, dtype=torch.float32, device=device).clamp_min(1e-12))

    san = {id(p) for p in model.items.san_parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) in san], "lr": cfg.lr_san},
              {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in san], "lr": cfg.lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)

    train_seqs = sp["train"]
    train_seqs = train_seqs[(train_seqs != 0).sum(1) >= 2]  # at least one (input, target) pair
    n_batches = math.ceil(len(train_seqs) / cfg.batch_size)
    frozen = [b.model for b in getattr(features, "backbones", {}).values()]  # uncached: backbones outside the model
    params = count_parameters(model, *frozen)
    log.info("%s: %d users, %d items, %s trainable parameters, device %s", cfg.method, len(train_seqs), data.n_items,
             f"{params['trainable_parameters']:,}", device)

    best = {"valid": None, "epoch": 0, "state": None}
    history, epoch_seconds = [], []
    watch, peak = Stopwatch(device), PeakMemory(device)  # both cover training steps only, not evaluation
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.as_tensor(rng.permutation(len(train_seqs)), device=device)
        losses = []
        t_epoch = watch.seconds
        with peak, watch:
            for b in tqdm(range(n_batches), desc=f"epoch {epoch}", unit="batch", leave=False, disable=None):
                seqs = train_seqs[order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]  # (B, L+1)
                slots = model.embed_slots(seqs)  # (B, L+1, d)
                user = model.seq(slots[:, :-1], seqs[:, :-1] != 0)  # (B, L, d)
                loss = debiased_in_batch_ce(user, slots, seqs, log_pop)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        epoch_seconds.append(watch.seconds - t_epoch)
        t_eval = time.perf_counter()
        valid = evaluate(model, n1, sp["valid_input"], sp["valid_target"], sp["valid_history"], cfg.eval_batch_size, cfg.metric_k, device)
        mean_loss = torch.stack(losses).mean().item()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss became {mean_loss} at epoch {epoch}; lower `lr`")
        hr = valid[f"HR@{cfg.metric_k}"]
        improved = best["valid"] is None or hr > best["valid"][f"HR@{cfg.metric_k}"]
        if improved:
            best = {"valid": valid, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            torch.save({"state_dict": best["state"], "config": asdict(cfg), "epoch": epoch}, out / "model.pt.tmp")
            os.replace(out / "model.pt.tmp", out / "model.pt")
        history.append({"epoch": epoch, "loss": mean_loss, **{f"valid_{k}": v for k, v in valid.items()},
                        "train_seconds": epoch_seconds[-1], "eval_seconds": time.perf_counter() - t_eval})
        log.info("epoch %3d  loss %.4f  valid HR@%d %.4f  NDCG@%d %.4f  %.1fs%s", epoch, mean_loss, cfg.metric_k, hr,
                 cfg.metric_k, valid[f"NDCG@{cfg.metric_k}"], epoch_seconds[-1], "  *" if improved else "")
        if epoch - best["epoch"] >= cfg.patience:
            log.info("early stop: no better valid HR@%d for %d epochs", cfg.metric_k, cfg.patience)
            break

    model.load_state_dict(best["state"])
    test = evaluate(model, n1, sp["test_input"], sp["test_target"], sp["test_history"], cfg.eval_batch_size, cfg.metric_k, device)
    log.info("best epoch %d: valid %s  test %s", best["epoch"], best["valid"], test)
    metrics = {"valid": best["valid"], "test": test, "best_epoch": best["epoch"], "epochs_run": len(history),
               "seed": cfg.seed, "config": asdict(cfg), "dataset": data.meta, "history": history,
               "caches": features.attrs if features else {}, **(extra_meta or {})}
    efficiency = {"method": cfg.method, "seconds_per_epoch": float(np.mean(epoch_seconds)),
                  "seconds_per_epoch_all": epoch_seconds, "peak_memory_bytes": peak.peak_bytes,
                  "peak_memory_kind": peak.kind, "device": str(device), "batch_size": cfg.batch_size, **params}
    _atomic_json(out / "gates.json", model.items.gate_values())
    _atomic_json(out / "efficiency.json", efficiency)
    _atomic_json(out / "metrics.json", metrics)  # last: its presence means the run finished
    return metrics
