"""Cached features: every item's selected layers, read once from the stage-one
caches into memory (the accelerator when present), gathered by item id."""

from __future__ import annotations

from iisan import cache
from iisan.data import PreparedData
from iisan.errors import ConfigError
from iisan.model import ItemSources

MODALITIES = ("text", "image")


class CachedFeatures:
    """``(ids) -> (text (M, Kt, Wt) | None, image (M, Kv, Wv) | None)`` as float32."""

    def __init__(self, data: PreparedData, stores: dict, device="cpu"):
        self.tensors, self.attrs = {}, {}
        for modality, store in stores.items():
            if store is None:
                continue
            field = cache.verify(store).get("field", "title" if modality == "text" else "image")
            tensor, attrs = cache.load(store, device, expect=cache.expected_for(data, field))
            self.tensors[modality], self.attrs[modality] = tensor, {**attrs, "store": str(store)}

    def __call__(self, ids):
        return tuple(self.tensors[m][ids].float() if m in self.tensors else None for m in MODALITIES)

    def shape(self, modality):
        t = self.tensors.get(modality)
        return (0, 0) if t is None else (t.shape[1], t.shape[2])


def cached_sources(data: PreparedData, device, *, caches: dict, **_) -> ItemSources:
    """Sources for methods that read the caches (``caches``: modality -> Zarr store)."""
    caches = {m: s for m, s in (caches or {}).items() if s is not None}
    if not caches:
        raise ConfigError("this method reads stage-one caches: give --text-cache and/or --image-cache")
    features = CachedFeatures(data, caches, device)
    return ItemSources(data, features=features, identities=features.attrs)
