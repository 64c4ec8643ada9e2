"""Backbones in the training loop.

- ``live_sources``: uncached IISAN. The frozen backbones compute every step's
  selected layers (forward only, no graph through them), rounded to the cache's
  float16, so uncached and cached IISAN are the same model.
- ``backbone_sources``: the embedded baselines (iisan.train.peft_baselines), whose
  backbones are themselves trained; weights keep float32 masters.
"""

from __future__ import annotations

import dataclasses

import torch

from iisan.core.errors import ConfigError
from iisan.data.prepared import PreparedData
from iisan.extract.backbones import Backbone
from iisan.extract.caption_table import read_captions
from iisan.extract.item_inputs import EncodedItems
from iisan.extract.layerdrop import select_layers
from iisan.extract.specs import BackboneSpec
from iisan.train.model import Inputs, ItemSources


class LiveFeatures:
    """Same interface as ``iisan.train.features.CachedFeatures``, computed by frozen backbones per step."""

    def __init__(self, data: PreparedData, backbones: dict[str, Backbone], layers: dict[str, list[int]],
                 texts: dict | None = None):  # fmt: skip
        self.backbones, self.layers = backbones, layers
        self.inputs = {m: EncodedItems(data, b, texts=(texts or {}).get(m)) for m, b in backbones.items()}

    def _one(self, modality, ids):
        if modality not in self.backbones:
            return None
        b, real = self.backbones[modality], ids[ids != 0]
        h = torch.zeros(len(ids), len(self.layers[modality]), b.info["hidden"], device=ids.device)
        if len(real):
            pooled = b.forward(self.inputs[modality](real.tolist()), self.layers[modality])
            h[ids != 0] = pooled.to(ids.device).half().float()  # the cache's precision: same model as cached IISAN
        return h

    def __call__(self, ids):
        return self._one("text", ids), self._one("image", ids)

    def shape(self, modality):
        if modality not in self.backbones:
            return (0, 0)
        return (len(self.layers[modality]), self.backbones[modality].info["hidden"])


def _specs(inputs: Inputs) -> dict[str, BackboneSpec]:
    specs = inputs.backbones()
    if not specs:
        raise ConfigError("this method runs backbones in the loop: give --text-backbone and/or --image-backbone")
    return specs


def _texts(data: PreparedData, inputs: Inputs, loaded: dict) -> tuple[dict, dict]:
    """The caption texts each tower reads instead of titles, and what identifies them."""
    texts, idents = {}, {}
    for m, folder in inputs.captions().items():
        if loaded[m].spec.modality != "text":
            raise ConfigError(f"--{m}-captions: captions are text; backbone {loaded[m].spec.model!r} encodes images")
        texts[m], meta = read_captions(folder, data)
        idents[m] = {"captions": meta["source"], "captions_fingerprint": meta["fingerprint"]}
    return texts, idents


def live_sources(data: PreparedData, inputs: Inputs, device, method, **_) -> ItemSources:
    loaded = {m: Backbone(s, device) for m, s in _specs(inputs).items()}
    texts, captions = _texts(data, inputs, loaded)
    taps = {m: select_layers(b.info["n_layers"], inputs.layers(m)) for m, b in loaded.items()}
    ids = {m: {**b.identity(), "layers": taps[m], "mode": method.name, **captions.get(m, {})}
           for m, b in loaded.items()}  # fmt: skip
    return ItemSources(data, features=LiveFeatures(data, loaded, taps, texts), identities=ids, texts=texts)


def backbone_sources(data: PreparedData, inputs: Inputs, device, method, **_) -> ItemSources:
    # weights that train keep float32 masters (auto would pick bf16 on a GPU)
    specs = {m: dataclasses.replace(s, dtype="float32") if s.dtype == "auto" else s for m, s in _specs(inputs).items()}
    loaded = {m: Backbone(s, device) for m, s in specs.items()}
    texts, captions = _texts(data, inputs, loaded)
    ids = {m: {**b.identity(), **captions.get(m, {})} for m, b in loaded.items()}
    return ItemSources(data, backbones=loaded, identities=ids, texts=texts)
