"""Cached features: every item's selected layers, read once from the stage-one
caches into memory (the accelerator when present), gathered by item id."""

from __future__ import annotations

import torch

from iisan.core.errors import ConfigError
from iisan.data.fields import DEFAULT_FIELD
from iisan.data.prepared import PreparedData
from iisan.extract import cache
from iisan.train.model import Inputs, ItemSources

MODALITIES = ("text", "image")


class CachedFeatures:
    """``(ids) -> (text (M, Kt, Wt) | None, image (M, Kv, Wv) | None)`` as float32."""

    def __init__(self, data: PreparedData, stores: dict, device="cpu"):
        self.tensors, self.attrs = {}, {}
        for modality, store in stores.items():
            if store is None:
                continue
            field = cache.verify(store).get("field", DEFAULT_FIELD[modality])
            rows, attrs = cache.load(store, expect=cache.expected_for(data, field))
            tensor = torch.from_numpy(rows).to(device)
            self.tensors[modality], self.attrs[modality] = tensor, {**attrs, "store": str(store)}

    def __call__(self, ids):
        return tuple(self.tensors[m][ids].float() if m in self.tensors else None for m in MODALITIES)

    def shape(self, modality):
        t = self.tensors.get(modality)
        return (0, 0) if t is None else (t.shape[1], t.shape[2])


def cached_sources(data: PreparedData, inputs: Inputs, device, method) -> ItemSources:
    """Sources for methods that read the caches."""
    caches = inputs.caches()
    if not caches:
        raise ConfigError("this method reads stage-one caches: give --text-cache and/or --image-cache")
    features = CachedFeatures(data, caches, device)
    return ItemSources(data, features=features, identities=features.attrs)
