"""Measurements: wall time and peak memory of ``with`` blocks, and parameter counts."""

from __future__ import annotations

import threading
import time

import psutil
import torch


class PeakMemory:
    """Peak memory inside ``with`` blocks (the maximum over all of them): accelerator
    bytes on CUDA (allocator peak), otherwise resident set size sampled every few
    milliseconds by a thread."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = torch.device(device), interval
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._proc, self._stop = psutil.Process(), threading.Event()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

        def sample():
            while not self._stop.wait(self.interval):
                self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
        return False


class Stopwatch:
    """Accumulates wall time of ``with`` blocks (synchronising CUDA at the edges)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._t
        return False


def count_parameters(*modules) -> dict:
    seen, total, trainable = set(), 0, 0
    for m in modules:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return {"trainable_parameters": trainable, "total_parameters": total}
