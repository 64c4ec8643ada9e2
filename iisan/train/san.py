"""Side adapted networks (method.md section 4): SAN blocks, gated towers, item encoders.

One code path serves IISAN-VS, IISAN-VA and text-only IISAN: towers take any
number of taps at any width; the inter tower runs at the image width and, when
the text width differs (VA), maps each text tap through its own Linear (DTL).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from iisan.core.errors import ConfigError
from iisan.train.model import ItemEncoder, ItemSources, trainable
from iisan.train.settings import ModelConfig, TrainConfig


class SANBlock(nn.Module):
    """SANB(x) = x + W_up ReLU(W_down x); weights N(0, 0.01), biases 0."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(x)))


class Gates(nn.Module):
    """One scalar gate per block, g = sigmoid(w / 0.1), w initialised to 0 (g = 0.5)."""

    def __init__(self, n: int, learned: bool):
        super().__init__()
        self.learned = learned
        self.w = nn.Parameter(torch.zeros(n), requires_grad=learned)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.w / 0.1) if self.learned else torch.full_like(self.w, 0.5)


class IntraTower(nn.Module):
    """t_k = SANB_k(g_k * h[l_k] + (1 - g_k) * t_{k-1}), t_0 = 0."""

    def __init__(self, taps: int, width: int, bottleneck: int, learned_gates: bool):
        super().__init__()
        self.blocks = nn.ModuleList(SANBlock(width, bottleneck) for _ in range(taps))
        self.gates = Gates(taps, learned_gates)

    def forward(self, h):  # h: (B, K, W)
        g, t = self.gates(), torch.zeros_like(h[:, 0])
        for k, block in enumerate(self.blocks):
            t = block(g[k] * h[:, k] + (1 - g[k]) * t)
        return t  # (B, W)


class InterTower(nn.Module):
    """m_k = SANB_k(m_{k-1} + b_k * v[l_k] + (1 - b_k) * X_k), at the image width.

    X_k = text tap (VS) or DTL_k(text tap) (VA). With unequal tap counts the top
    taps of the longer side pair with the shorter side (as the paper does)."""

    def __init__(self, taps: int, text_width: int, image_width: int, bottleneck: int, learned_gates: bool):
        super().__init__()
        self.taps = taps
        self.blocks = nn.ModuleList(SANBlock(image_width, bottleneck) for _ in range(taps))
        self.gates = Gates(taps, learned_gates)
        self.dtl = (
            nn.ModuleList(nn.Linear(text_width, image_width) for _ in range(taps))
            if text_width != image_width
            else None
        )

    def forward(self, ht, hv):  # (B, Kt, Wt), (B, Kv, Wv)
        ht, hv = ht[:, -self.taps :], hv[:, -self.taps :]
        b, m = self.gates(), torch.zeros_like(hv[:, 0])
        for k, block in enumerate(self.blocks):
            x = self.dtl[k](ht[:, k]) if self.dtl is not None else ht[:, k]
            m = block(m + b[k] * hv[:, k] + (1 - b[k]) * x)
        return m  # (B, Wv)


class SANItemEncoder(ItemEncoder):
    """An item's selected layers -> its embedding e = FL([e_image : e_inter : e_text]).

    Tap counts and widths come from the features (cached or live); with one
    modality the inter tower switches itself off."""

    @classmethod
    def configure(cls, cfg: ModelConfig, sources: ItemSources) -> ModelConfig:
        cfg = super().configure(cfg, sources)
        if not cfg.text_taps and not cfg.image_taps:
            raise ConfigError("the item encoder needs at least one modality (a text or an image cache)")
        if cfg.inter and not (cfg.text_taps and cfg.image_taps):
            cfg = dataclasses.replace(cfg, inter=False)  # single-modality data: nothing to fuse across
        if not cfg.intra and not cfg.inter:
            raise ConfigError("`intra`: with one modality only the intra tower exists; it cannot be switched off")
        return cfg

    def __init__(self, cfg: ModelConfig, sources: ItemSources):
        super().__init__(cfg, sources)
        cfg = self.cfg
        self.features = sources.features
        self.text = self.image = self.inter = None
        heads = {}
        if cfg.intra and cfg.image_taps:
            self.image = IntraTower(cfg.image_taps, cfg.image_width, cfg.bottleneck, cfg.learned_gates)
            heads["image"] = nn.Linear(cfg.image_width, cfg.d)
        if cfg.inter:
            self.inter = InterTower(
                min(cfg.text_taps, cfg.image_taps), cfg.text_width, cfg.image_width, cfg.bottleneck, cfg.learned_gates
            )
            heads["inter"] = nn.Linear(cfg.image_width, cfg.d)
        if cfg.intra and cfg.text_taps:
            self.text = IntraTower(cfg.text_taps, cfg.text_width, cfg.bottleneck, cfg.learned_gates)
            heads["text"] = nn.Linear(cfg.text_width, cfg.d)
        self.heads = nn.ModuleDict(heads)
        self.fusion = nn.Linear(len(heads) * cfg.d, cfg.d)

    def towers(self):
        return {
            name: t for name, t in (("text", self.text), ("image", self.image), ("inter", self.inter)) if t is not None
        }

    def param_groups(self, tc: TrainConfig) -> list[dict]:
        """SAN blocks at ``lr_san``; gates, DTLs, heads and fusion at ``lr``."""
        san = [p for t in self.towers().values() for blk in t.blocks for p in blk.parameters() if p.requires_grad]
        ids = {id(p) for p in san}
        return [
            {"params": san, "lr": tc.lr_san},
            {"params": [p for p in trainable(self) if id(p) not in ids], "lr": tc.lr},
        ]

    def encode(self, ht=None, hv=None):  # ht: (B, Kt, Wt) text taps, hv: (B, Kv, Wv) image taps -> (B, d)
        outs = []  # order [image : inter : text]
        if self.image is not None:
            outs.append(self.heads["image"](self.image(hv)))
        if self.inter is not None:
            outs.append(self.heads["inter"](self.inter(ht, hv)))
        if self.text is not None:
            outs.append(self.heads["text"](self.text(ht)))
        return self.fusion(torch.cat(outs, dim=-1))

    def forward(self, ids):  # (M,) -> (M, d)
        return self.encode(*self.features(ids))

    def diagnostics(self) -> dict:
        """The gate values per tower (the paper's gate analysis): {tower: [g_1..g_K]}."""
        return {name: t.gates().tolist() for name, t in self.towers().items()}
