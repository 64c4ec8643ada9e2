"""The recommender every method shares, and the one place it is built.

RecBole's idea: the trainer and the evaluator never ask which method they
hold. Every method is an ``ItemEncoder`` (ids -> (M, d)) plus a user encoder
(the SASRec encoder, or a constant for popularity), both named by the registry
(iisan/train/methods.py).

``Inputs`` is what a run's item encoder reads, by tower: a stage-one cache, or
a backbone and its layer selection. ``build`` resolves the method once, opens
its inputs as ``ItemSources`` (the prepared data, features of each item's
selected layers, loaded backbones, and the identities a checkpoint records),
derives the model's shapes from them and builds the model. Training and
rebuilding a trained run from its checkpoint (``iisan.use.trained``) both call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from iisan.core.errors import ConfigError
from iisan.data.prepared import PreparedData
from iisan.extract.specs import BackboneSpec
from iisan.train import methods
from iisan.train.settings import ModelConfig, TrainConfig

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class Tower:
    """What one tower reads: a cache (cached methods), or a backbone and its layers (methods that run it)."""

    cache: str | None = None
    backbone: BackboneSpec | None = None
    layers: dict | list | None = None  # an iisan.extract.layerdrop spec
    captions: str | None = None  # a folder from `iisan caption`: the backbone reads these instead of titles


@dataclass(frozen=True)
class Inputs:
    """A run's inputs, by modality (``text``, ``image``)."""

    towers: dict[str, Tower] = field(default_factory=dict)

    @classmethod
    def of(cls, caches: dict | None = None, backbones: dict | None = None, layers: dict | None = None,
           captions: dict | None = None) -> Inputs:  # fmt: skip
        """From per-modality caches, backbone specs, layer selections and caption folders (as the
        command line gives them)."""
        caches, backbones, layers, captions = caches or {}, backbones or {}, layers or {}, captions or {}
        for m in captions:
            if backbones.get(m) is None:
                raise ConfigError(f"--{m}-captions: captions are read by a backbone in the loop; give "
                                  f"--{m}-backbone (a cached method reads a cache of captions from "
                                  "`iisan extract --captions`)")  # fmt: skip
        return cls({m: Tower(caches.get(m), backbones.get(m), layers.get(m), captions.get(m))
                    for m in MODALITIES if caches.get(m) is not None or backbones.get(m) is not None})  # fmt: skip

    def caches(self) -> dict[str, str]:
        return {m: t.cache for m, t in self.towers.items() if t.cache is not None}

    def backbones(self) -> dict[str, BackboneSpec]:
        return {m: t.backbone for m, t in self.towers.items() if t.backbone is not None}

    def layers(self, modality: str):
        t = self.towers.get(modality)
        return (t.layers if t else None) or {}

    def captions(self) -> dict[str, str]:
        return {m: t.captions for m, t in self.towers.items() if t.captions is not None}

    def record(self) -> dict:
        """What a checkpoint keeps: where the caches were (absolute), the backbone specs, the layers."""
        return {
            "caches": {m: str(Path(p).resolve()) for m, p in self.caches().items()},
            "backbones": {m: dataclasses.asdict(s) for m, s in self.backbones().items()},
            "layers": {m: t.layers for m, t in self.towers.items() if t.layers is not None},
            "captions": {m: str(Path(p).resolve()) for m, p in self.captions().items()},
        }

    @classmethod
    def from_record(cls, record: dict, caches: dict | None = None) -> Inputs:
        """The inputs a checkpoint recorded, with ``caches`` (modality -> store) moved elsewhere."""
        stores = {**record["caches"], **(caches or {})}
        specs = {m: BackboneSpec(**s) for m, s in record["backbones"].items()}
        captions = record.get("captions", {})
        towers = {m: Tower(stores.get(m), specs.get(m), record["layers"].get(m), captions.get(m))
                  for m in MODALITIES if m in stores or m in specs}  # fmt: skip
        return cls(towers)


@dataclass
class ItemSources:
    """What an item encoder reads. ``features(ids)`` -> (text (M, K, W) | None, image (M, K, W) | None)."""

    data: PreparedData
    features: object | None = None  # iisan.train.features.CachedFeatures or iisan.train.live.LiveFeatures
    backbones: dict = field(default_factory=dict)  # modality -> iisan.extract.backbones.Backbone (trained in the loop)
    texts: dict = field(default_factory=dict)  # modality -> texts by item id its backbone reads instead of titles
    identities: dict = field(default_factory=dict)  # modality -> what identifies the input (cache attrs, backbone)

    def shape(self, modality: str) -> tuple[int, int]:
        """(taps, width) of a modality's features; (0, 0) when absent."""
        return self.features.shape(modality) if self.features is not None else (0, 0)

    def frozen_modules(self) -> list[nn.Module]:
        """Backbones that compute features but are not part of the model (counted in its total size)."""
        return [b.model for b in getattr(self.features, "backbones", {}).values()]


def data_sources(data: PreparedData, inputs: Inputs, device, method, **_) -> ItemSources:
    """Sources for methods that read item ids only."""
    return ItemSources(data)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class ItemEncoder(nn.Module):
    """Maps item ids to embeddings, (M,) -> (M, d). ``configure`` derives the model's
    shapes from what the encoder reads (a new config; the one given is never changed),
    ``__init__(cfg, sources)`` sets up the layers and keeps the derived config as
    ``self.cfg``; subclasses override ``forward`` and what else differs."""

    def __init__(self, cfg: ModelConfig, sources: ItemSources):
        super().__init__()
        self.cfg = self.configure(cfg, sources)

    @classmethod
    def configure(cls, cfg: ModelConfig, sources: ItemSources) -> ModelConfig:
        """``cfg`` with the tap counts and widths of the features filled in."""
        (kt, wt), (kv, wv) = sources.shape("text"), sources.shape("image")
        return dataclasses.replace(cfg, text_taps=kt, text_width=wt, image_taps=kv, image_width=wv)

    def param_groups(self, tc: TrainConfig) -> list[dict]:
        """Optimizer groups; by default every trainable parameter at ``lr``."""
        return [{"params": trainable(self), "lr": tc.lr}]

    def diagnostics(self) -> dict:
        """Learned values worth reporting (e.g. gates); JSON-serialisable."""
        return {}


class Recommender(nn.Module):
    """Item encoder + user encoder; users are scored against items by dot product.
    ``method`` (an ``iisan.train.methods.Method``) and ``sources`` are what it was built from."""

    def __init__(self, method: methods.Method, items: ItemEncoder, sources: ItemSources):
        super().__init__()
        self.method, self.sources, self.cfg = method, sources, items.cfg
        self.items = items
        self.seq = method.user_encoder_class(items.cfg)

    def embed_items(self, ids: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, d)
        return self.items(ids)

    def embed_slots(self, seqs: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, d), padding = 0
        uniq, inv = torch.unique(seqs, return_inverse=True)  # encode each distinct item once
        e = self.embed_items(uniq)[inv]
        return e * (seqs != 0)[..., None]

    def users(self, inputs: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """(U, T) -> (U, d): the state at the last position. ``items``: every item's embedding,
        (N+1, d), when already computed (evaluation), so histories are looked up, not re-encoded."""
        slots = self.embed_slots(inputs) if items is None else items[inputs] * (inputs != 0)[..., None]
        return self.seq(slots, inputs != 0)[:, -1]

    def param_groups(self, tc: TrainConfig) -> list[dict]:
        groups = self.items.param_groups(tc)
        groups.append({"params": trainable(self.seq), "lr": tc.lr})
        return [g for g in groups if g["params"]]

    def diagnostics(self) -> dict:
        return self.items.diagnostics()


def build(mc: ModelConfig, data: PreparedData, inputs: Inputs, device, residency: str = "auto",
          sources: ItemSources | None = None) -> Recommender:  # fmt: skip
    """The model for ``mc.method`` over ``inputs`` on ``device``: the method resolved once,
    its inputs opened (caches where ``residency`` says: iisan.train.features) unless
    ``sources`` are given already open, the shapes derived (``model.cfg``; ``mc`` is not changed)."""
    method = methods.get(mc.method)
    sources = sources or method.open(data, inputs, device, residency)
    cfg = dataclasses.replace(mc, n_items=data.n_items, max_len=data.max_len, peft=dict(mc.peft))
    return Recommender(method, method.item_encoder_class(cfg, sources), sources).to(device)


def _device(model) -> torch.device:
    return next(iter(model.buffers()), next(model.parameters(), torch.empty(0))).device


@torch.no_grad()
def item_embeddings(model: Recommender, chunk: int, float32: bool = True) -> torch.Tensor:
    """Every item's embedding, (N+1, d) (row 0 = padding), encoded ``chunk`` items at a time;
    float32 unless ``float32=False`` keeps the encoder's own dtype (popularity's float64)."""
    model.eval()
    n1 = model.cfg.n_items + 1
    ids = torch.arange(n1, device=_device(model))
    parts = [model.embed_items(ids[i : i + chunk]) for i in range(0, n1, chunk)]
    return torch.cat([p.float() for p in parts] if float32 else parts)


@torch.no_grad()
def user_embeddings(model: Recommender, inputs: torch.Tensor, chunk: int, float32: bool = True,
                    items: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The user state after each history, (U, d), on the model's device, ``chunk`` users at a
    time (``items``: the item embeddings, if computed already)."""
    model.eval()
    inputs = inputs.to(_device(model))
    parts = [model.users(inputs[i : i + chunk], items) for i in range(0, len(inputs), chunk)]
    return torch.cat([p.float() for p in parts] if float32 else parts)
