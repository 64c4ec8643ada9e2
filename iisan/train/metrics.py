"""Full-ranking evaluation: HR@K and NDCG@K over all items, history excluded.

Ranks are counted in blocks of users x items, so memory is bounded by the blocks
(``USER_BLOCK`` x ``ITEM_BLOCK`` scores), not by the catalogue: each target's score
is taken from the very block product it is compared in (the same shapes give the
same bits), then every block adds the items scoring at least as high. With one item
block (catalogues up to ``ITEM_BLOCK`` items) that is one product per user block.
"""

from __future__ import annotations

import torch

USER_BLOCK, ITEM_BLOCK = 1024, 16384  # a 64 MiB float32 score block (recommend's top-K uses the same)


def _block_scores(users: torch.Tensor, items: torch.Tensor, i0: int, history: torch.Tensor) -> torch.Tensor:
    """``users @ items.T`` for one item block starting at id ``i0``: excluded items (the padding
    item 0, each user's history) and non-finite scores (the worst possible) are -inf."""
    s = users @ items.T  # (U, I)
    s = torch.where(torch.isfinite(s), s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    if i0 == 0:
        s[:, 0] = float("-inf")
    local = history - i0
    rows, cols = ((history > 0) & (local >= 0) & (local < s.shape[1])).nonzero(as_tuple=True)
    s[rows, local[rows, cols]] = float("-inf")
    return s


def rank_of_target(users: torch.Tensor, items: torch.Tensor, target: torch.Tensor, history: torch.Tensor,
                   item_block: int = ITEM_BLOCK) -> torch.Tensor:  # fmt: skip
    """0-based rank of each user's target among all items 1..N.

    users: (U, d); items: (N+1, d) (row 0 = padding); target: (U,); history: (U, H) ids,
    0-padded. History items are removed from the ranking; a target that is itself in
    the history is a miss (rank N+1), as is a target whose score is not finite. Ties
    count against the target (pessimistic); other items' non-finite scores never beat it."""
    n1, blocks = len(items), range(0, len(items), item_block)
    in_hist = (history == target[:, None]).any(1)
    t = torch.full((len(users),), float("-inf"), dtype=users.dtype, device=users.device)
    above = torch.zeros(len(users), dtype=torch.long, device=users.device)
    single = len(blocks) == 1
    for i0 in blocks:  # the targets' own scores, each from its block's product
        mine = ((target >= i0) & (target < i0 + item_block)).nonzero(as_tuple=True)[0]
        if len(mine):
            s = _block_scores(users, items[i0 : i0 + item_block], i0, history)
            t[mine] = s[mine, target[mine] - i0]
            if single:
                above += (s >= t[:, None]).sum(1)
    if not single:
        for i0 in blocks:
            above += (_block_scores(users, items[i0 : i0 + item_block], i0, history) >= t[:, None]).sum(1)
    miss = in_hist | ~torch.isfinite(t)
    return torch.where(miss, torch.full_like(above, n1), above - 1)  # the target counted itself


def hr_ndcg(ranks: torch.Tensor, k: int) -> dict:
    hit = ranks < k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks.double() + 2.0), torch.zeros((), dtype=torch.float64))
    return {f"HR@{k}": hit.double().mean().item(), f"NDCG@{k}": ndcg.mean().item()}
