"""Item ids -> a backbone's model inputs (tokenised titles or processed images).

``ItemInputs`` makes them on demand: stage one streams items through it, decoding a
chunk's images in worker processes when there are cores to spare. ``EncodedItems``
serves the methods that run backbones at every training step: titles are tokenised
once and kept (token ids are small), images are read and processed per batch, so
memory never holds a catalogue's pixels (a million 224 x 224 images are 300 GB).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import torch
from PIL import Image

from iisan.data.prepared import PreparedData
from iisan.extract.backbones import Backbone

_SOURCE = None  # a worker process's own ImageSource (zip and LMDB handles do not cross processes)


def _open_source(path: str) -> None:
    from iisan.data.images import ImageSource

    global _SOURCE
    _SOURCE = ImageSource(path)


def _decode(key: str) -> Image.Image:
    return _SOURCE.load(key)


def decode_workers(n_images: int) -> int:
    """Worker processes for decoding ``n_images``: the cores beyond the one running the model, up
    to 8; none for a handful of images (starting processes would cost more)."""
    return 0 if n_images < 64 else min(8, max(0, (os.cpu_count() or 1) - 1))


class ItemInputs:
    """Turns item ids into model inputs (titles, another text field, or decoded images)."""

    def __init__(self, data: PreparedData, backbone: Backbone, texts: list[str] | None = None,
                 workers: int | None = None):  # fmt: skip
        self.data, self.backbone = data, backbone
        self.texts = texts or data.titles  # another text field (captions) indexed by item id
        self.images = data.image_source() if backbone.spec.modality == "image" else None
        self.workers = workers
        self._pool = None
        if self.images is not None:
            s = backbone.image_size or 224
            self.blank = Image.new("RGB", (s, s), (128, 128, 128))

    def raw(self, ids: list[int]) -> list:
        """Titles, or PIL images (a blank one where the item has none), decoded in worker processes
        when there are many."""
        if self.images is None:
            return [self.texts[i] for i in ids]
        keys = [self.data.image_keys[i] for i in ids]
        workers = decode_workers(len(keys)) if self.workers is None else self.workers
        if workers > 1:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(workers, initializer=_open_source, initargs=(str(self.images.path),))
            decoded = iter(self._pool.map(_decode, [k for k in keys if k], chunksize=16))
            return [next(decoded) if k else self.blank for k in keys]
        return [self.images.load(k) if k else self.blank for k in keys]

    def __call__(self, ids: list[int]) -> dict:
        return self.backbone.encode_inputs(self.raw(ids))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class EncodedItems:
    """Model inputs of items for a backbone in the training loop: titles tokenised once,
    right-padded to ``max_text_len`` and sliced per batch to its longest title; images
    read and processed per batch."""

    def __init__(self, data: PreparedData, backbone: Backbone, chunk: int = 1024, texts: list[str] | None = None):
        self.make = ItemInputs(data, backbone, texts=texts, workers=0)
        self.tensors = None
        if backbone.spec.modality != "text":
            return
        parts: dict[str, list] = {}
        n1 = data.n_items + 1
        for lo in range(0, n1, chunk):
            for k, v in self.make(list(range(lo, min(lo + chunk, n1)))).items():
                pad = backbone.processor.pad_token_id if k == "input_ids" else 0
                parts.setdefault(k, []).append(torch.nn.functional.pad(v, (0, backbone.spec.max_text_len - v.shape[1]),
                                                                       value=pad))  # fmt: skip
        self.tensors = {k: torch.cat(v) for k, v in parts.items()}

    def __call__(self, ids: list[int]) -> dict:
        if self.tensors is None:
            return {k: v.float() if v.is_floating_point() else v for k, v in self.make(ids).items()}
        idx = torch.as_tensor(ids)
        out = {k: v[idx] for k, v in self.tensors.items()}
        width = max(int(out["attention_mask"].sum(1).max()), 1)
        return {k: v[:, :width] for k, v in out.items()}
