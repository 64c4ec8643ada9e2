"""The one device resolver (``auto`` means CUDA when present, else the CPU), and
the switch to deterministic kernels that makes training reproducible."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger(__name__)

# cuBLAS is deterministic only with a fixed workspace, read when its handle is created: set it before any CUDA work
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s asked for but CUDA is not available; using the CPU", name)
        return torch.device("cpu")
    return torch.device(name)


def input_device(model, default: torch.device) -> torch.device:
    """Where a loaded model's inputs go: where its embeddings live (the first entry of an
    accelerate device map; the CPU if that is disk), else ``default``."""
    hf_map = getattr(model, "hf_device_map", None)
    first = next(iter(hf_map.values())) if hf_map else default
    return torch.device("cpu" if first in ("disk", "meta") else first)


@contextlib.contextmanager
def deterministic(device: torch.device | None = None):
    """Deterministic kernels inside the block (the previous settings are restored after).

    Several CPU threads otherwise accumulate the gradient of an index (the item
    encoder's gather of each slot's embedding) in a different order every run. On
    CUDA: cuBLAS with a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, set when this
    module is imported, before any CUDA work), cuDNN without autotuning, the math
    attention kernel (flash and memory-efficient attention have no deterministic
    backward), and an error rather than a warning for any op without a deterministic
    implementation, so a run is reproducible or stops saying why."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.device(device or "cpu").type == "cuda"
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)  # fmt: skip
    torch.use_deterministic_algorithms(True, warn_only=not cuda)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with sdpa_kernel(SDPBackend.MATH) if cuda else contextlib.nullcontext():
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
