"""Item ids -> a backbone's model inputs (tokenised titles or processed images).

``ItemInputs`` makes them on demand (stage one streams items through it);
``EncodedItems`` makes every item's once and keeps them in memory, for the
methods that run backbones at every training step: decoding JPEGs and running
an image processor each step would cost more than the backbones.
"""

from __future__ import annotations

import torch
from PIL import Image

from iisan.data.prepared import PreparedData
from iisan.extract.backbones import Backbone


class ItemInputs:
    """Turns item ids into model inputs (titles, another text field, or decoded images)."""

    def __init__(self, data: PreparedData, backbone: Backbone, texts: list[str] | None = None):
        self.data, self.backbone = data, backbone
        self.texts = texts or data.titles  # another text field (captions) indexed by item id
        self.images = data.image_source() if backbone.spec.modality == "image" else None
        if self.images is not None:
            s = backbone.image_size or 224
            self.blank = Image.new("RGB", (s, s), (128, 128, 128))

    def raw(self, ids: list[int]) -> list:
        """Titles, or PIL images (a blank one where the item has none)."""
        if self.images is None:
            return [self.texts[i] for i in ids]
        return [self.images.load(self.data.image_keys[i]) if self.data.image_keys[i] else self.blank for i in ids]

    def __call__(self, ids: list[int]) -> dict:
        return self.backbone.encode_inputs(self.raw(ids))


class EncodedItems:
    """Model inputs of every item, encoded once: token ids/masks right-padded to
    ``max_text_len`` (sliced per batch to its longest title), or pixel values."""

    def __init__(self, data: PreparedData, backbone: Backbone, chunk: int = 1024):
        make, n1 = ItemInputs(data, backbone), data.n_items + 1
        parts: dict[str, list] = {}
        for lo in range(0, n1, chunk):
            enc = make(list(range(lo, min(lo + chunk, n1))))
            for k, v in enc.items():
                if v.dim() == 2:  # (B, T) text: pad to a fixed width so chunks stack
                    pad = backbone.processor.pad_token_id if k == "input_ids" else 0
                    v = torch.nn.functional.pad(v, (0, backbone.spec.max_text_len - v.shape[1]), value=pad)
                parts.setdefault(k, []).append(v.half() if v.is_floating_point() else v)
        self.tensors = {k: torch.cat(v) for k, v in parts.items()}

    def __call__(self, ids: list[int]) -> dict:
        idx = torch.as_tensor(ids)
        out = {k: v[idx] for k, v in self.tensors.items()}
        if "attention_mask" in out:
            width = max(int(out["attention_mask"].sum(1).max()), 1)
            out = {k: v[:, :width] if v.dim() == 2 else v for k, v in out.items()}
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
