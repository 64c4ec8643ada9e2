"""The recommender every method shares: an item encoder and a user encoder.

RecBole's idea: the trainer and the evaluator never ask which method they
hold. Every method is an ``ItemEncoder`` (ids -> (M, d)) plus a user encoder
(the SASRec encoder, or a constant for popularity), both named by the registry
(iisan/methods.py). The encoder base class gives defaults for parameter groups
and diagnostics, so a method overrides only what differs.

``ItemSources`` is what an item encoder may read: the prepared data, features
of each item's selected layers (cached or computed live), or loaded backbones.
``identities`` record where they came from; a checkpoint carries them so a
run can be rebuilt without config.yaml (see ``iisan.checkpoint``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from iisan import methods
from iisan.data import PreparedData
from iisan.settings import ModelConfig, TrainConfig


@dataclass
class ItemSources:
    """What an item encoder reads. ``features(ids)`` -> (text (M, K, W) | None, image (M, K, W) | None)."""

    data: PreparedData
    features: object | None = None  # iisan.features.CachedFeatures or iisan.live.LiveFeatures
    backbones: dict = field(default_factory=dict)  # modality -> iisan.backbones.Backbone (trained in the loop)
    identities: dict = field(default_factory=dict)  # modality -> what identifies the input (cache attrs, backbone)

    def shape(self, modality: str) -> tuple[int, int]:
        """(taps, width) of a modality's features; (0, 0) when absent."""
        return self.features.shape(modality) if self.features is not None else (0, 0)

    def frozen_modules(self) -> list[nn.Module]:
        """Backbones that compute features but are not part of the model (counted in its total size)."""
        return [b.model for b in getattr(self.features, "backbones", {}).values()]


def data_sources(data: PreparedData, device, **_) -> ItemSources:
    """Sources for methods that read item ids only."""
    return ItemSources(data)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class ItemEncoder(nn.Module):
    """Maps item ids to embeddings, (M,) -> (M, d). Subclasses set up their layers
    in ``__init__(cfg, sources)`` (filling the derived fields of ``cfg``) and
    override ``forward``; the defaults below suit most of them."""

    def __init__(self, cfg: ModelConfig, sources: ItemSources):
        super().__init__()
        self.cfg = cfg

    def param_groups(self, tc: TrainConfig) -> list[dict]:
        """Optimizer groups; by default every trainable parameter at ``lr``."""
        return [{"params": trainable(self), "lr": tc.lr}]

    def diagnostics(self) -> dict:
        """Learned values worth reporting (e.g. gates); JSON-serialisable."""
        return {}


class Recommender(nn.Module):
    """Item encoder + user encoder; users are scored against items by dot product."""

    def __init__(self, cfg: ModelConfig, sources: ItemSources):
        super().__init__()
        method = methods.get(cfg.method)
        cfg.n_items, cfg.max_len = sources.data.n_items, sources.data.max_len
        self.cfg = cfg
        self.items = methods.load(method.item_encoder)(cfg, sources)
        self.seq = methods.load(method.user_encoder)(cfg)

    def embed_items(self, ids: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, d)
        return self.items(ids)

    def embed_slots(self, seqs: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, d), padding = 0
        uniq, inv = torch.unique(seqs, return_inverse=True)  # encode each distinct item once
        e = self.embed_items(uniq)[inv]
        return e * (seqs != 0)[..., None]

    def users(self, inputs: torch.Tensor) -> torch.Tensor:  # (U, T) -> (U, d): state at the last position
        return self.seq(self.embed_slots(inputs), inputs != 0)[:, -1]

    def param_groups(self, tc: TrainConfig) -> list[dict]:
        groups = self.items.param_groups(tc)
        groups.append({"params": trainable(self.seq), "lr": tc.lr})
        return [g for g in groups if g["params"]]

    def diagnostics(self) -> dict:
        return self.items.diagnostics()

    @classmethod
    def from_checkpoint(cls, run_dir, **kw) -> Recommender:
        """The trained model of a run folder, rebuilt from its model.pt alone (see iisan.checkpoint.load_run)."""
        from iisan.checkpoint import load_run

        return load_run(run_dir, **kw)[0]


def build(cfg: ModelConfig, sources: ItemSources) -> Recommender:
    """The model for ``cfg.method`` over ``sources`` (``cfg`` is copied, then its
    derived fields are filled in)."""
    return Recommender(dataclasses.replace(cfg, peft=dict(cfg.peft)), sources)
