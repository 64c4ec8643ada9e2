"""Training time and memory against batch size (the paper's Figure 5).

One process per (method, batch size), so a batch's peak memory is its own: the
model and its inputs are set up exactly as for training, then ``steps`` steps
are timed after one warm-up step. Peak memory is the CUDA allocator's peak on a
GPU; on the CPU it is the peak resident set size minus the process's resident
size just before the first step, so what differs between methods is their own
training memory (activations, gradients, optimizer state), not the libraries
every process loads. A batch of one trains nothing (its only in-batch
candidates are the user's own items) but costs the same compute; it is timed
like the others.
"""

from __future__ import annotations

import logging
import math

import psutil
import torch

from iisan.core.device import deterministic, resolve_device
from iisan.core.errors import ConfigError
from iisan.core.measure import PeakMemory, Stopwatch, count_parameters
from iisan.train import methods
from iisan.train.loop import setup, step
from iisan.train.model import Inputs
from iisan.train.settings import ModelConfig, TrainConfig

log = logging.getLogger(__name__)


def profile(data_dir, mc: ModelConfig, tc: TrainConfig, batch_size: int, steps: int, inputs: Inputs) -> dict:
    """Time ``steps`` training steps at ``batch_size``; returns seconds and peak memory."""
    if not methods.get(mc.method).trains:
        raise ConfigError(f"method {mc.method!r} has nothing to train, so no training time to profile")
    with deterministic(resolve_device(tc.device)):
        s = setup(data_dir, mc, tc, inputs)
        s.model.train()
        g = torch.Generator().manual_seed(tc.seed)
        batches = [torch.randint(len(s.train_seqs), (batch_size,), generator=g) for _ in range(steps + 1)]
        step(s, s.train_seqs[batches[0].to(s.device)])  # warm-up: lazy allocations, kernel selection
        baseline = 0 if s.device.type == "cuda" else psutil.Process().memory_info().rss
        watch, peak = Stopwatch(s.device), PeakMemory(s.device)
        with peak, watch:
            for idx in batches[1:]:
                step(s, s.train_seqs[idx.to(s.device)])
    per_step = watch.seconds / steps
    n_users = len(s.train_seqs)
    result = {
        "method": mc.method,
        "batch_size": batch_size,
        "steps": steps,
        "seconds_per_step": per_step,
        "seconds_per_epoch": per_step * math.ceil(n_users / batch_size),
        "users": n_users,
        "peak_memory_bytes": max(peak.peak_bytes - baseline, 0),
        "peak_memory_kind": peak.kind if s.device.type == "cuda" else "cpu_peak_rss_above_baseline",
        "device": str(s.device),
        **count_parameters(s.model, *s.model.sources.frozen_modules()),
    }
    log.info("%s, batch %d: %.4f s/step, %.1f s/epoch, peak %.1f MiB", mc.method, batch_size, per_step,
             result["seconds_per_epoch"], result["peak_memory_bytes"] / 2**20)  # fmt: skip
    return result
