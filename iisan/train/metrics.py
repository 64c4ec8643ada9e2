"""Full-ranking evaluation: HR@K and NDCG@K over all items, history excluded."""

from __future__ import annotations

import torch


def rank_of_target(scores: torch.Tensor, target: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items 1..N.

    scores: (U, N+1) (column 0 = padding); target: (U,); history: (U, H) ids, 0-padded.
    History items are removed from the ranking; a target that is itself in the
    history is a miss (rank N+1). Ties count against the target (pessimistic).
    """
    n1 = scores.shape[1]
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    in_hist = (history == target[:, None]).any(1)
    scores.scatter_(1, history, float("-inf"))
    t = scores.gather(1, target[:, None])  # (U, 1)
    above = (scores >= t).sum(1) - 1  # items other than the target scoring at least as high
    return torch.where(in_hist, torch.full_like(above, n1), above)


def hr_ndcg(ranks: torch.Tensor, k: int) -> dict:
    hit = ranks < k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks.double() + 2.0), torch.zeros((), dtype=torch.float64))
    return {f"HR@{k}": hit.double().mean().item(), f"NDCG@{k}": ndcg.mean().item()}
