"""Side adapted networks (method.md section 4): SAN blocks, gated towers, item encoders.

One code path serves IISAN-VS, IISAN-VA and text-only IISAN: towers take any
number of taps at any width. The inter tower runs at the narrower of the two
widths and maps each tap of the wider side through its own Linear (DTL): the
text taps of an LLM down to the image width (VA, the paper's Eq. 4), the image
taps of ViT-large/huge down to BERT-base's width (as the authors' code does).
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
    """m_k = SANB_k(m_{k-1} + b_k * V_k + (1 - b_k) * X_k), at width min(W_text, W_image).

    X_k = text tap and V_k = image tap, the wider of the two through DTL_k (VS:
    none). With unequal tap counts the top taps of the longer side pair with
    the shorter side (the paper's Table VIII)."""

    def __init__(self, taps: int, text_width: int, image_width: int, bottleneck: int, learned_gates: bool):
        super().__init__()
        self.taps, self.width = taps, min(text_width, image_width)
        self.blocks = nn.ModuleList(SANBlock(self.width, bottleneck) for _ in range(taps))
        self.gates = Gates(taps, learned_gates)
        wider = max(text_width, image_width)
        self.dtl = nn.ModuleList(nn.Linear(wider, self.width) for _ in range(taps)) if wider != self.width else None
        self.project = "text" if text_width > image_width else "image" if image_width > text_width else None

    def forward(self, ht, hv):  # (B, Kt, Wt), (B, Kv, Wv)
        ht, hv = ht[:, -self.taps :], hv[:, -self.taps :]
        b, m = self.gates(), torch.zeros_like(ht[:, 0, : self.width])
        for k, block in enumerate(self.blocks):
            x, v = ht[:, k], hv[:, k]
            if self.project == "text":
                x = self.dtl[k](x)
            elif self.project == "image":
                v = self.dtl[k](v)
            m = block(m + b[k] * v + (1 - b[k]) * x)
        return m  # (B, min(Wt, Wv))


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
        if cfg.text_taps and cfg.image_taps and cfg.text_taps != cfg.image_taps and not cfg.allow_unequal_taps:
            raise ConfigError(
                f"the text input has {cfg.text_taps} taps and the image input {cfg.image_taps}: the paper pairs "
                "them one to one (IISAN-VA keeps as many text taps as image taps, e.g. text `layers: {n: 6}` "
                "against a 12-layer ViT); select equal counts, or set `allow_unequal_taps: true` to pair the top "
                "taps (Table VIII's 24+12 and 12+6 rows)"
            )
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
            heads["inter"] = nn.Linear(self.inter.width, cfg.d)
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
