"""The lower anchors every model must beat (method.md section 6).

- ``FrozenItemEncoder``: a Linear head on each modality's last cached layer
  (the frozen-backbone model);
- ``IDItemEncoder``: a free embedding per item (ID-based SASRec, no content);
- ``PopularityItemEncoder`` + ``ConstantUserEncoder``: every user scores item i
  by its training popularity p_i, a model with nothing to fit.
"""

from __future__ import annotations

import torch
from torch import nn

from iisan.train.model import ItemEncoder, ItemSources
from iisan.train.settings import ModelConfig


class FrozenItemEncoder(ItemEncoder):
    """e = Linear([h_text[last] : h_image[last]])."""

    def __init__(self, cfg: ModelConfig, sources: ItemSources):
        super().__init__(cfg, sources)
        cfg = self.cfg
        self.features = sources.features
        self.head = nn.Linear(
            (cfg.text_width if cfg.text_taps else 0) + (cfg.image_width if cfg.image_taps else 0), cfg.d
        )

    def forward(self, ids):  # (M,) -> (M, d)
        last = [h[:, -1] for h in self.features(ids) if h is not None]
        return self.head(torch.cat(last, dim=-1))


class IDItemEncoder(ItemEncoder):
    """ID-based SASRec: a free embedding per item."""

    def __init__(self, cfg: ModelConfig, sources: ItemSources):
        super().__init__(cfg, sources)
        self.emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, ids):
        return self.emb(ids)


class PopularityItemEncoder(ItemEncoder):
    """Item i -> [p_i] (float64, so distinct counts never tie)."""

    def __init__(self, cfg: ModelConfig, sources: ItemSources):
        super().__init__(cfg, sources)
        p = torch.as_tensor(sources.data.popularity, dtype=torch.float64)[:, None]
        self.register_buffer("popularity", p)  # (N+1, 1)

    def forward(self, ids):
        return self.popularity[ids]


class ConstantUserEncoder(nn.Module):
    """Every user is [1], so a user's score for item i is p_i."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, item_emb, real):  # (B, T, 1) -> (B, T, 1)
        return torch.ones_like(item_emb)
