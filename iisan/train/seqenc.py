"""SASRec-style sequence encoder (method.md section 5).

d = 64, 2 blocks, 2 heads, FFN 4d ReLU, dropout 0.1, post-LayerNorm, learned
positions, causal + padding mask. Every position predicts the next item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iisan.train.settings import ModelConfig


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x, mask):  # x: (B, T, d); mask: (B, 1, T, T) True = may attend
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d/h)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = self.ln1(x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d))))  # post-LN
        return self.ln2(x + self.drop(self.ffn(x)))


class SequenceEncoder(nn.Module):
    """Item embeddings of a history -> the user state after each position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pos = nn.Embedding(cfg.max_len, cfg.d)
        self.ln, self.drop = nn.LayerNorm(cfg.d), nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))

    def forward(self, item_emb, real):  # item_emb: (B, T, d) left-padded; real: (B, T) bool
        T = item_emb.shape[1]
        x = self.drop(self.ln(item_emb + self.pos.weight[-T:]))  # positions aligned to the right end
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # keys must be real and not in the future; each position may always see itself so
        # padded rows never have an empty softmax (they are ignored by loss and ranking)
        mask = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)
        mask = mask[:, None]  # (B, 1, T, T)
        for blk in self.blocks:
            x = blk(x, mask)
        return x  # (B, T, d): user state after each position
