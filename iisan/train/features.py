"""Cached features: every item's selected layers from the stage-one caches, gathered by
item id from wherever they reside (a run's ``residency``):

- ``device``: every row on the execution device; a step gathers its items there;
- ``host``: every row in host memory (pinned under CUDA); a step gathers its unique
  items there and copies them over without blocking;
- ``disk``: rows read in place from the store when a step needs them
  (``iisan.extract.cache.CacheReader``: one positioned read per row, its checksum
  checked, a bounded LRU of recent rows), so memory is bounded by the batch.

``auto`` picks ``device`` when the caches take at most half the accelerator's free
memory (on CPU, where device and host are one, half the available memory), else
``host`` when they take at most half the available host memory, else ``disk``, and
logs the choice. All three give the same values, so training is identical.
Every row is checked finite when it is read (at load for device and host).
"""

from __future__ import annotations

import logging

import psutil
import torch

from iisan.core.errors import ConfigError, DataError
from iisan.data.fields import DEFAULT_FIELD
from iisan.data.prepared import PreparedData
from iisan.extract import cache
from iisan.train.model import Inputs, ItemSources

log = logging.getLogger(__name__)

MODALITIES = ("text", "image")
LRU_BYTES = 256 * 2**20  # the disk residency's cache of recently read rows


def choose_residency(nbytes: int, device: torch.device) -> str:
    """Where caches of ``nbytes`` go by default (see the module docstring)."""
    host_free = psutil.virtual_memory().available
    if device.type == "cuda":
        if nbytes <= torch.cuda.mem_get_info(device)[0] // 2:
            return "device"
        return "host" if nbytes <= host_free // 2 else "disk"
    return "device" if nbytes <= host_free // 2 else "disk"


class CachedFeatures:
    """``(ids) -> (text (M, Kt, Wt) | None, image (M, Kv, Wv) | None)`` as float32, on ``device``."""

    def __init__(self, data: PreparedData, stores: dict, device="cpu", residency: str = "auto"):
        self.device = torch.device(device)
        self.readers, self.tensors, self.attrs = {}, {}, {}
        for modality, store in stores.items():
            field = cache.verify(store, check_data=False).get("field", DEFAULT_FIELD[modality])
            row = len(cache.read_attrs(store)["layers"]) * cache.read_attrs(store)["hidden"] * 2
            reader = cache.open_reader(store, cache.expected_for(data, field), cache_rows=LRU_BYTES // row)
            self.readers[modality], self.attrs[modality] = reader, {**reader.attrs, "store": str(store)}
        total = sum(r.nbytes for r in self.readers.values())
        self.residency = choose_residency(total, self.device) if residency == "auto" else residency
        if self.residency not in ("device", "host", "disk"):
            raise ConfigError(f"`residency`={residency!r} must be auto, device, host or disk")
        if residency == "auto":
            log.info("caches (%s) reside on the %s", cache.human_bytes(total), self.residency)
        if self.residency != "disk":
            for m, reader in self.readers.items():
                rows = torch.from_numpy(reader.read_all())  # every checksum checked, every row finite
                reader.close()
                home = self.device if self.residency == "device" else torch.device("cpu")
                self.tensors[m] = (
                    rows.pin_memory() if home.type == "cpu" and self.device.type == "cuda" else rows.to(home)
                )

    def _rows(self, modality: str, ids: torch.Tensor) -> torch.Tensor:
        if self.residency == "device":
            return self.tensors[modality][ids]
        uniq, inv = torch.unique(ids.cpu(), return_inverse=True)  # each distinct item read once
        if self.residency == "host":
            rows = self.tensors[modality][uniq]
        else:
            reader = self.readers[modality]
            rows = torch.from_numpy(reader.rows(uniq.numpy()))
            if not torch.isfinite(rows).all():
                bad = uniq[~torch.isfinite(rows).flatten(1).all(1)].tolist()
                raise DataError(reader.store, f"{len(bad)} row(s) hold non-finite values (item ids {bad[:10]})",
                                "extract this cache again with a wider `dtype` (float32 or bfloat16)")  # fmt: skip
        return rows.to(self.device, non_blocking=True)[inv.to(self.device)]

    def __call__(self, ids):
        return tuple(self._rows(m, ids).float() if m in self.readers else None for m in MODALITIES)

    def shape(self, modality):
        r = self.readers.get(modality)
        return (0, 0) if r is None else (r.k, r.h)


def cached_sources(data: PreparedData, inputs: Inputs, device, method, residency: str = "auto") -> ItemSources:
    """Sources for methods that read the caches."""
    caches = inputs.caches()
    if not caches:
        raise ConfigError("this method reads stage-one caches: give --text-cache and/or --image-cache")
    features = CachedFeatures(data, caches, device, residency)
    return ItemSources(data, features=features, identities=features.attrs)
