"""Offloaded backbones run layer by layer, with the weights that move counted as they move.

A model too large for the execution device keeps its embeddings, final norm and as
many transformer layers as ``max_memory`` allows there (resident); every other layer
lives in a *home*: pinned host memory (``cpu``) or a safetensors file per layer in
the offload folder (``disk``), and its tensors are on the ``meta`` device, holding no
memory, except while it runs. A chunk of items runs through the model one layer at a
time: the layer's tensors (parameters and buffers alike, so GPTQ's 4-bit ``qweight``
buffers too) are copied in, every pass of the chunk runs through it, its taps are
pooled, and it is released. A streamed layer's weights thus cross the bus once per
chunk instead of once per pass, and all the device memory the plan leaves goes to
activations. accelerate's hooks do not stream buffers (``offload_buffers=False``
keeps them resident) and gptqmodel's kernels keep state derived from them, which is
why iisan does this itself.

Quantised kernels are streamable when the state they derive from their buffers is a
cache iisan can clear on release (the ``STREAMABLE`` list, first match); any other
kernel is refused with the backend to use instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from iisan.core.errors import ConfigError

log = logging.getLogger(__name__)

# gptqmodel kernels that stream, and the methods that drop what they derived from the weights
STREAMABLE = {"TorchLinear": ("_stream_reset_cache", "clear_weight_cache", "_reset_prefetch_state")}
TIERS = ("cpu", "disk")


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name (non-persistent buffers included)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(module).values())


def quantised_kernels(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The quantised linear layers of ``module`` (GPTQ keeps its weights as ``qweight`` buffers)."""
    return [m for m in module.modules() if "qweight" in dict(m.named_buffers(recurse=False))]


def check_streamable(module: torch.nn.Module, backend: str | None) -> None:
    """Raise unless every quantised kernel in ``module`` can be streamed."""
    for m in quantised_kernels(module):
        if type(m).__name__ not in STREAMABLE:
            raise ConfigError(
                f"GPTQ kernel {type(m).__name__} (backend {backend or 'auto'}) repacks the 4-bit weights when it "
                f"first runs and keeps that state, so its layers cannot stream off the device\n"
                f"  fix: set the backbone's `backend: torch` (streams; kernels: {sorted(STREAMABLE)}), or give "
                "`max_memory` room for the whole model on the accelerator so nothing streams"
            )


def _set(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Point ``module``'s parameter or buffer ``name`` at ``value`` (a parameter stays a frozen parameter)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


class LayerStream:
    """The streamed layers of one model: their homes, and moving them in and out.

    ``moved_bytes`` counts every byte copied onto the execution device; ``loads``
    counts layer loads."""

    def __init__(self, blocks: torch.nn.ModuleList, homes: dict[int, str], device: torch.device,
                 folder: str | Path | None = None, backend: str | None = None):  # fmt: skip
        self.blocks, self.device, self.homes = blocks, torch.device(device), dict(homes)
        self.moved_bytes = self.loads = 0
        self._state: dict[int, dict | Path] = {}
        if any(t == "disk" for t in self.homes.values()):
            if folder is None:
                raise ConfigError("layers are planned on disk but the backbone has no `offload_folder`\n"
                                  "  fix: set `offload_folder`, or give `max_memory` more room")  # fmt: skip
            self.folder = Path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)
        for i, tier in self.homes.items():
            check_streamable(blocks[i], backend)
            self._home(i, tier)

    def _home(self, i: int, tier: str) -> None:
        """Move layer ``i``'s tensors to its home and leave the layer on ``meta``."""
        block = self.blocks[i]
        state = {n: t.detach().to("cpu").clone() for n, t in tensors(block).items()}  # own storage each (no views)
        if tier == "disk":
            from safetensors.torch import save_file

            path = self.folder / f"layer-{i:03d}.safetensors"
            save_file(state, str(path))
            self._state[i] = path
        else:
            pin = self.device.type == "cuda"
            self._state[i] = {n: t.pin_memory() if pin else t for n, t in state.items()}
        for name, t in state.items():
            _set(block, name, torch.empty_like(t, device="meta"))
        self._clear(block)

    @staticmethod
    def _clear(block: torch.nn.Module) -> None:
        for m in quantised_kernels(block):
            for method in STREAMABLE[type(m).__name__]:
                getattr(m, method)()

    def load(self, i: int) -> None:
        """Bring layer ``i`` onto the execution device (from pinned memory or its file)."""
        if i not in self.homes:
            return
        block, home = self.blocks[i], self._state[i]
        if isinstance(home, Path):
            from safetensors import safe_open

            with safe_open(str(home), framework="pt", device="cpu") as f:
                state = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            state = home
        for name, t in state.items():
            _set(block, name, t.to(self.device, non_blocking=True))
            self.moved_bytes += t.numel() * t.element_size()
        self.loads += 1

    def release(self, i: int) -> None:
        """Drop layer ``i`` from the execution device (its home keeps the weights)."""
        if i not in self.homes:
            return
        block = self.blocks[i]
        for name, t in tensors(block).items():
            _set(block, name, torch.empty_like(t, device="meta"))
        self._clear(block)

    def materialised(self) -> int:
        """Tensors of streamed layers that hold memory now (0 between passes)."""
        return sum(t.device.type != "meta" for i in self.homes for t in tensors(self.blocks[i]).values())
