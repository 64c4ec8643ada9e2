"""In-batch debiased cross-entropy (paper eq. 6-7, method.md section 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def debiased_in_batch_ce(
    user: torch.Tensor, items: torch.Tensor, seqs: torch.Tensor, log_pop: torch.Tensor
) -> torch.Tensor:
    """Mean CE over real positions.

    user:    (B, T, d) user state after each input position (T = L)
    items:   (B, L+1, d) embeddings of every item slot of the batch
    seqs:    (B, L+1) item ids, left-padded with 0; inputs seqs[:, :-1], targets seqs[:, 1:]
    log_pop: (N+1,) log popularity of each item

    Candidates are all B*(L+1) slots; logits = user . item - log p_item. Padding
    columns are masked, and for user u every column holding an item of u's own
    sequence is masked except the true next item's own slot.
    """
    B, S = seqs.shape
    T = S - 1
    cand_ids = seqs.reshape(-1)  # (B*S,)
    logits = user.reshape(B * T, -1) @ items.reshape(B * S, -1).T  # (B*T, B*S)
    logits = logits - log_pop[cand_ids].masked_fill(cand_ids == 0, 0.0)[None, :]
    own = (seqs[:, :, None] == cand_ids[None, None, :]).any(1)  # (B, B*S): column holds an item of user u
    blocked = own[:, None, :].expand(B, T, B * S) | (cand_ids == 0)[None, None, :]  # (B, T, B*S)
    # the positive of position t of user u is slot u*S + t + 1
    pos = torch.arange(B, device=seqs.device)[:, None] * S + torch.arange(1, S, device=seqs.device)[None, :]  # (B, T)
    blocked = blocked.scatter(2, pos[:, :, None], False).reshape(B * T, B * S)
    logits = logits.masked_fill(blocked, float("-inf"))
    real = (seqs[:, :-1] != 0).reshape(-1)  # an input item exists (then the target does too)
    return F.cross_entropy(logits[real], pos.reshape(-1)[real])
