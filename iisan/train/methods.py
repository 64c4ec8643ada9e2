"""The registry of methods: the one place method names are listed.

Each method is an item encoder (and, for all but popularity, the SASRec user
encoder) trained by the same loop. What differs is what its item encoder reads:

- ``cache``: the Zarr caches of LayerDrop-selected layers (stage one's output);
- ``live``: the same selected layers, computed by frozen backbones in the loop;
- ``backbone``: raw item inputs through backbones that are themselves trained
  (fully or by embedded PEFT);
- ``ids``: item ids only.

The training loop, the Snakemake workflow (which inputs a run needs, which code
it depends on) and the config schema (the ``method`` enum) all read this table,
so adding a method means one entry here and one module with its item encoder.
This module imports nothing heavy: the workflow reads it at DAG-build time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from iisan.core.errors import ConfigError

# what each kind of input is opened by: (data, model.Inputs, device, Method, residency=) -> model.ItemSources
SOURCES = {
    "cache": "iisan.train.features:cached_sources",
    "live": "iisan.train.live:live_sources",
    "backbone": "iisan.train.live:backbone_sources",
    "ids": "iisan.train.model:data_sources",
}


@dataclass(frozen=True)
class Method:
    """One method: what it reads and where its item encoder lives."""

    name: str
    label: str  # default row label in reports
    reads: str  # a key of SOURCES
    item_encoder: str  # "module:Class", a subclass of iisan.train.model.ItemEncoder
    user_encoder: str = "iisan.train.seqenc:SequenceEncoder"
    trains: bool = True  # False: nothing to fit (popularity); evaluated once
    reference: bool = False  # the efficiency tables' yardstick (time / FFT)

    @property
    def needs_cache(self) -> bool:
        return self.reads == "cache"

    @property
    def needs_backbones(self) -> bool:
        return self.reads in ("live", "backbone")

    @property
    def needs_content(self) -> bool:
        """Reads item texts and/or images (through a cache or a backbone)."""
        return self.reads != "ids"

    @property
    def sources(self) -> str:
        return SOURCES[self.reads]

    @property
    def item_encoder_class(self):
        return load(self.item_encoder)

    @property
    def user_encoder_class(self):
        return load(self.user_encoder)

    def open(self, data, inputs, device, residency: str = "auto"):
        """What this method's item encoder reads (``inputs``: an ``iisan.train.model.Inputs``),
        opened on ``device`` (caches where ``residency`` says): an ``iisan.train.model.ItemSources``."""
        return load(self.sources)(data, inputs, device, self, residency=residency)

    @property
    def modules(self) -> tuple[str, ...]:
        """Modules its code lives in beyond the training loop (for code hashes)."""
        return tuple(dict.fromkeys(_module(r) for r in (self.sources, self.item_encoder, self.user_encoder)))


def _module(ref: str) -> str:
    return ref.split(":")[0]


def load(ref: str):
    """The object named by ``"module:attr"``."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("iisan", "IISAN", reads="cache", item_encoder="iisan.train.san:SANItemEncoder"),
        Method("frozen", "frozen backbone", reads="cache", item_encoder="iisan.train.anchors:FrozenItemEncoder"),
        Method("uncached", "IISAN uncached", reads="live", item_encoder="iisan.train.san:SANItemEncoder"),
        Method(
            "fft", "FFT", reads="backbone", item_encoder="iisan.train.peft_baselines:FFTItemEncoder", reference=True
        ),
        Method("lora", "LoRA", reads="backbone", item_encoder="iisan.train.peft_baselines:LoRAItemEncoder"),
        Method("adapter", "Adapter", reads="backbone", item_encoder="iisan.train.peft_baselines:AdapterItemEncoder"),
        Method("bitfit", "BitFit", reads="backbone", item_encoder="iisan.train.peft_baselines:BitFitItemEncoder"),
        Method("id", "SASRec (ID)", reads="ids", item_encoder="iisan.train.anchors:IDItemEncoder"),
        Method(
            "pop",
            "popularity",
            reads="ids",
            item_encoder="iisan.train.anchors:PopularityItemEncoder",
            user_encoder="iisan.train.anchors:ConstantUserEncoder",
            trains=False,
        ),
    )
}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not one of {list(METHODS)}")
    return METHODS[name]
