"""What an offloaded backbone will hold where, and what running it will cost, before it runs.

The same placement rule serves ``iisan plan`` (sizes from the model's config, on the
meta device: no weights read) and ``iisan.extract.backbones.Backbone`` (sizes of the
loaded tensors): the embeddings and final norm always sit on the execution device;
then transformer layers, in order, while ``max_memory`` for that device allows; the
rest stream (``iisan.extract.streaming``), homed in host memory while
``max_memory["cpu"]`` allows, then on disk.

Activation room is what the device has left once the resident weights, one
streamed layer, the CUDA context and the chunk's hidden states are taken; a
token inside a decoder layer peaks at about ``2 * hidden + 3 * intermediate``
values (the residual and its norm, then the MLP's gate, up and their product).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from iisan.core.errors import ConfigError

CUDA_CONTEXT_BYTES = 500 * 10**6  # the CUDA context and allocator slack
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_bytes(size, what: str = "size") -> int:
    """``20GiB``, ``1.5GB``, ``1MB`` or a number of bytes -> bytes."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"{what}={size!r} is not a size; give e.g. 20GiB, 1.5GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def budget(max_memory: dict | None, device) -> tuple[int | None, int | None]:
    """(bytes of weights the execution device may hold, bytes the host may hold for streamed layers)
    from a ``max_memory`` mapping (GPU index or ``cpu`` -> size); None where none is given."""
    max_memory = max_memory or {}
    key = "cpu" if device.type == "cpu" else (device.index or 0)
    dev = max_memory.get(key, max_memory.get(str(key)))
    host = None if device.type == "cpu" else max_memory.get("cpu")
    return (None if dev is None else parse_bytes(dev, f"max_memory[{key!r}]"),
            None if host is None else parse_bytes(host, "max_memory['cpu']"))  # fmt: skip


@dataclass
class Placement:
    """Where each transformer layer lives: resident on the device, or streamed from a home."""

    fixed_bytes: int  # embeddings, final norm: always on the device
    layer_bytes: list[int]
    resident: list[int] = field(default_factory=list)
    homes: dict[int, str] = field(default_factory=dict)  # streamed layer -> "cpu" | "disk"

    @property
    def resident_bytes(self) -> int:
        return self.fixed_bytes + sum(self.layer_bytes[i] for i in self.resident)

    @property
    def streamed_bytes(self) -> int:
        """Weight bytes that cross to the device for every chunk (once per streamed layer)."""
        return sum(self.layer_bytes[i] for i in self.homes)

    @property
    def largest_streamed(self) -> int:
        return max((self.layer_bytes[i] for i in self.homes), default=0)


def place(fixed_bytes: int, layer_bytes: list[int], device_budget: int | None, host_budget: int | None) -> Placement:
    """Fill the device in layer order, then host memory, then disk (see the module docstring)."""
    p = Placement(fixed_bytes, list(layer_bytes))
    if device_budget is not None and fixed_bytes > device_budget:
        raise ConfigError(
            f"max_memory for the execution device ({device_budget:,} B) leaves no room for the embeddings and "
            f"final norm ({fixed_bytes:,} B), which every pass needs\n"
            f"  fix: give the device at least {math.ceil(fixed_bytes / 2**20) + 1} MiB in `max_memory`"
        )
    used, host_used = fixed_bytes, 0
    for i, size in enumerate(layer_bytes):
        if (device_budget is None or used + size <= device_budget) and not p.homes:
            p.resident.append(i)
            used += size
        elif host_budget is not None and host_used + size <= host_budget:
            p.homes[i] = "cpu"
            host_used += size
        else:
            p.homes[i] = "disk"
    return p


def linear_bytes(in_features: int, out_features: int, bias: bool, dtype_bytes: int, quant: dict | None) -> int:
    """Bytes of one linear layer: fp weights, or GPTQ's packed 4-bit weights with their
    per-group scales and zero points and the group index."""
    if not quant:
        return (in_features * out_features + (out_features if bias else 0)) * dtype_bytes
    bits, group = int(quant.get("bits", 4)), int(quant.get("group_size") or in_features)
    group = in_features if group <= 0 else group
    groups = math.ceil(in_features / group)
    packed = in_features * out_features * bits // 8  # qweight (int32-packed)
    zeros = groups * out_features * bits // 8  # qzeros (int32-packed)
    scales = groups * out_features * 2  # fp16
    g_idx = in_features * 4  # int32
    return packed + zeros + scales + g_idx + (out_features * 2 if bias else 0)


def sizes_from_config(config, dtype_bytes: int = 2) -> tuple[int, list[int], dict]:
    """(fixed bytes, bytes of each transformer layer, shape facts) of a model built on the meta
    device from its config: no weights are read or allocated."""
    import torch
    from transformers import AutoModel

    quant = getattr(config, "quantization_config", None)
    quant = quant if isinstance(quant, dict) or quant is None else quant.to_dict()
    cfg = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    text = getattr(cfg, "text_config", None) or cfg
    n = text.num_hidden_layers
    blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)

    def size(module) -> int:
        total = 0
        for m in module.modules():
            own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if isinstance(m, torch.nn.Linear) and quant:
                total += linear_bytes(m.in_features, m.out_features, m.bias is not None, dtype_bytes, quant)
            else:
                total += sum(t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size()) for t in own)
        return total

    layers = [size(b) for b in blocks]
    facts = {"hidden": text.hidden_size, "intermediate": getattr(text, "intermediate_size", 4 * text.hidden_size),
             "n_layers": n, "params": sum(p.numel() for p in model.parameters()), "quantization": quant}  # fmt: skip
    return size(model) - sum(layers), layers, facts


def tokens_per_batch(room_bytes: int, hidden: int, intermediate: int, dtype_bytes: int = 2, step: int = 256) -> int:
    """The padded-token budget a pass may use in ``room_bytes`` of activations (a multiple of ``step``)."""
    per_token = (2 * hidden + 3 * intermediate) * dtype_bytes
    return max(step, room_bytes // per_token // step * step)


@dataclass
class Plan:
    """A whole extraction, predicted."""

    placement: Placement
    facts: dict
    device_memory: int | None  # the card's memory (None: unknown, so no activation room)
    chunk_items: int
    tokens_per_item: float
    n_items: int
    dtype_bytes: int = 2
    context_bytes: int = CUDA_CONTEXT_BYTES
    device: str = "cuda:0"

    @property
    def per_token_bytes(self) -> int:
        return (2 * self.facts["hidden"] + 3 * self.facts["intermediate"]) * self.dtype_bytes

    @property
    def chunk_hidden_bytes(self) -> int:
        """The hidden states of one chunk, kept on the device between layers."""
        return int(self.chunk_items * self.tokens_per_item * self.facts["hidden"] * self.dtype_bytes)

    @property
    def activation_room(self) -> int | None:
        if self.device_memory is None:
            return None
        p = self.placement
        extra = self.chunk_hidden_bytes if p.homes else 0
        return self.device_memory - p.resident_bytes - p.largest_streamed - self.context_bytes - extra

    @property
    def tokens_per_batch(self) -> int | None:
        room = self.activation_room
        if room is None:
            return None
        if room <= 0:
            raise ConfigError(f"the plan leaves no activation room ({room:,} B): lower `max_memory` for the device")
        return tokens_per_batch(room, self.facts["hidden"], self.facts["intermediate"], self.dtype_bytes)

    @property
    def chunks(self) -> int:
        return math.ceil((self.n_items + 1) / self.chunk_items)

    @property
    def passes(self) -> int | None:
        t = self.tokens_per_batch
        return None if t is None else math.ceil(self.n_items / max(1, int(t // self.tokens_per_item)))

    def seconds(self, bandwidth: float, flops: float) -> dict:
        """Predicted time: streamed bytes over the bus, and 2 FLOP per parameter per token."""
        bus = self.chunks * self.placement.streamed_bytes / bandwidth
        compute = 2 * self.facts["params"] * self.n_items * self.tokens_per_item / flops
        return {"bus_seconds": bus, "compute_seconds": compute, "total_seconds": bus + compute}

    def as_dict(self, bandwidth: float, flops: float) -> dict:
        p = self.placement
        return {"device": self.device, "resident": p.resident, "homes": {str(k): v for k, v in p.homes.items()},
                "fixed_bytes": p.fixed_bytes, "layer_bytes": p.layer_bytes,
                "streamed_bytes_per_chunk": p.streamed_bytes,
                "per_token_bytes": self.per_token_bytes, "activation_room": self.activation_room,
                "tokens_per_batch": self.tokens_per_batch, "passes": self.passes,
                **self.seconds(bandwidth, flops)}  # fmt: skip

    def table(self, bandwidth: float | None = None, flops: float | None = None) -> list[tuple[str, str]]:
        p, gb = self.placement, 1e9
        rows = [
            ("layers resident / streamed", f"{len(p.resident)} / {len(p.homes)}"
             + (f" ({sum(t == 'cpu' for t in p.homes.values())} from host memory, "
                f"{sum(t == 'disk' for t in p.homes.values())} from disk)" if p.homes else "")),
            ("weights per layer", f"{p.layer_bytes[0] / gb:.3f} GB" if p.layer_bytes else "-"),
            ("embeddings and norm (resident)", f"{p.fixed_bytes / gb:.2f} GB"),
            ("weights on the device", f"{p.resident_bytes / gb:.2f} GB"),
            ("weights streamed per chunk", f"{p.streamed_bytes / gb:.2f} GB ({self.chunks} chunks of "
                                           f"{self.chunk_items} items)"),
            ("peak bytes per token in a layer", f"{self.per_token_bytes / 1024:.0f} KiB"),
        ]  # fmt: skip
        room = self.activation_room
        if room is None:
            rows.append(("activation room", "unknown: give --device-memory"))
        else:
            rows += [("activation room", f"{room / gb:.2f} GB"), ("tokens_per_batch", f"{self.tokens_per_batch}"),
                     ("passes over the dataset", f"{self.passes} ({self.n_items:,} items x "
                                                 f"{self.tokens_per_item:g} tokens)")]  # fmt: skip
        if bandwidth and flops:
            s = self.seconds(bandwidth, flops)
            rows.append(("predicted time", f"{s['total_seconds']:.0f} s (bus {s['bus_seconds']:.0f} s at "
                                           f"{bandwidth / gb:g} GB/s, compute {s['compute_seconds']:.0f} s at "
                                           f"{flops / 1e12:g} TFLOP/s)"))  # fmt: skip
        return rows
