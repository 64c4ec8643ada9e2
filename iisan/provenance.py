"""Content hashes of the code each pipeline stage runs.

The Snakefile passes these as rule params, so editing a module reruns exactly
the stages that import it; extraction also stores its hash in the cache so a
rerun rebuilds the store instead of "resuming" chunks made by older code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_PKG = Path(__file__).resolve().parent
STAGE_MODULES = {
    "prepare": ("data.py", "rawdata.py", "images.py", "synth.py"),
    "backbones": ("tiny.py",),
    "extract": ("extract.py", "backbones.py", "cache.py", "layers.py", "images.py"),
    "train": ("train.py", "san.py", "seqenc.py", "loss.py", "metrics.py", "efficiency.py", "cache.py"),
    # methods that run backbones in the loop also depend on how items are encoded
    "train_live": ("train.py", "san.py", "seqenc.py", "loss.py", "metrics.py", "efficiency.py", "cache.py",
                   "embedded.py", "backbones.py", "extract.py", "images.py"),
    "report": ("report.py", "efficiency.py"),
}


def code_hash(stage: str) -> str:
    h = hashlib.sha256()
    for name in STAGE_MODULES[stage]:
        h.update(name.encode())
        h.update((_PKG / name).read_bytes())
    return h.hexdigest()[:16]
