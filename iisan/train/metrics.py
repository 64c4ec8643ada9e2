"""Full-ranking evaluation: HR@K and NDCG@K over all items, history excluded, and top-K lists.

Ranks are counted in blocks of users x items, so memory is bounded by the blocks
(``USER_BLOCK`` x ``ITEM_BLOCK`` scores), not by the catalogue: each target's score
is taken from the very block product it is compared in (the same shapes give the
same bits), then every block adds the items scoring at least as high. With one item
block (catalogues up to ``ITEM_BLOCK`` items, the paper's datasets among them) that is
one product per user block, scored in place.

Top-K lists keep a running top-K over the same blocks. Ties are broken by the lower
item id, so the result does not depend on the blocks: each (score, id) pair becomes one
int64 key whose order is "higher score, then lower id", and a plain top-K of the keys
is exact.
"""

from __future__ import annotations

import torch

USER_BLOCK, ITEM_BLOCK = 1024, 65536  # at most 256 MiB of float32 scores; one item block up to 65,536 items


def _block_scores(users: torch.Tensor, items: torch.Tensor, i0: int, history: torch.Tensor,
                  bad: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """``users @ items.T`` for one item block starting at id ``i0``, with excluded items (the
    padding item 0, each user's history) and items whose embedding is not finite (``bad``,
    block-local columns) at -inf: the worst, never counted above a target."""
    s = users @ items.T  # (U, I), ours to change in place
    if i0 == 0:
        s[:, 0] = float("-inf")
    if bad is not None and len(bad):
        s[:, bad] = float("-inf")
    if i0 == 0 and s.shape[1] == len(items) and history.numel() and int(history.max()) < s.shape[1]:
        s.scatter_(1, history, float("-inf"))  # the whole catalogue in this block: every id is a column
    else:
        local = history - i0
        rows, cols = ((history > 0) & (local >= 0) & (local < s.shape[1])).nonzero(as_tuple=True)
        s[rows, local[rows, cols]] = float("-inf")
    return s


def _at_least(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """How many scores of each row are >= its threshold; ``s`` is overwritten (an in-place
    comparison and a float sum, exact below 2**24 columns, are 8x faster than a boolean count)."""
    return s.ge_(t[:, None]).sum(1).long()


def rank_of_target(users: torch.Tensor, items: torch.Tensor, target: torch.Tensor, history: torch.Tensor,
                   item_block: int = ITEM_BLOCK) -> torch.Tensor:  # fmt: skip
    """0-based rank of each user's target among all items 1..N.

    users: (U, d); items: (N+1, d) (row 0 = padding); target: (U,); history: (U, H) ids,
    0-padded. History items are removed from the ranking; a target that is itself in
    the history is a miss (rank N+1), as is one whose score is not finite (a user's or
    the target's embedding that is not). Ties count against the target (pessimistic);
    items whose embedding is not finite rank below every other."""
    n1, blocks = len(items), range(0, len(items), item_block)
    bad_items = (~torch.isfinite(items).all(1)).nonzero(as_tuple=True)[0]
    in_hist = (history == target[:, None]).any(1)
    t = torch.full((len(users),), float("-inf"), dtype=users.dtype, device=users.device)
    above = torch.zeros(len(users), dtype=torch.long, device=users.device)

    def bad(i0):
        local = bad_items[(bad_items >= i0) & (bad_items < i0 + item_block)] - i0
        return local if len(local) else None

    for i0 in blocks:  # the targets' own scores, each from its block's product (the same bits pass 2 compares)
        mine = ((target >= i0) & (target < i0 + item_block)).nonzero(as_tuple=True)[0]
        if len(mine):
            s = _block_scores(users, items[i0 : i0 + item_block], i0, history, bad(i0))
            t[mine] = s[mine, target[mine] - i0]
            if len(blocks) == 1:  # one block: the product just made is the whole comparison
                above += _at_least(s, t)
            del s
    if len(blocks) > 1:
        for i0 in blocks:
            above += _at_least(_block_scores(users, items[i0 : i0 + item_block], i0, history, bad(i0)), t)
    miss = in_hist | ~torch.isfinite(t)
    return torch.where(miss, torch.full_like(above, n1), above - 1)  # the target counted itself


def hr_ndcg(ranks: torch.Tensor, k: int) -> dict:
    hit = ranks < k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks.double() + 2.0), torch.zeros((), dtype=torch.float64))
    return {f"HR@{k}": hit.double().mean().item(), f"NDCG@{k}": ndcg.mean().item()}


def _keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (score descending, id ascending): an order-preserving int32 image
    of the float32 score in the high half, the complement of the id in the low half."""
    bits = scores.float().contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # monotone in the float value
    return (ordered << 32) | (0xFFFFFFFF - ids.to(torch.int64))


def top_k(users: torch.Tensor, items: torch.Tensor, exclude: torch.Tensor | None, k: int,
          user_chunk: int = USER_BLOCK, item_chunk: int = ITEM_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top-``k`` items per user by dot product: (scores (U, k) float32, item ids (U, k) int64).

    ``items``: (N+1, d) with row 0 the padding item (never recommended); ``exclude``:
    (U, H) item ids per user to leave out (0 = none)."""
    n1 = len(items)
    k = min(k, n1 - 1)
    lowest = torch.iinfo(torch.int64).min
    out_scores, out_ids = [], []
    for u0 in range(0, len(users), user_chunk):
        u = users[u0 : u0 + user_chunk]
        ex = None if exclude is None else exclude[u0 : u0 + user_chunk]
        best = torch.full((len(u), k), lowest, dtype=torch.int64)
        for i0 in range(0, n1, item_chunk):
            scores = u @ items[i0 : i0 + item_chunk].T  # (Uc, Ic)
            scores = scores.masked_fill(~torch.isfinite(scores), -torch.inf)  # non-finite: never recommended
            if i0 == 0:
                scores[:, 0] = -torch.inf
            if ex is not None:
                local = ex - i0  # excluded ids in this chunk, as column indices
                rows, cols = ((ex > 0) & (local >= 0) & (local < scores.shape[1])).nonzero(as_tuple=True)
                scores[rows, local[rows, cols]] = -torch.inf
            best = torch.topk(torch.cat([best, _chunk_keys(scores, i0, k)], dim=1), k, dim=1).values
        out_scores.append(_score_of(best))
        out_ids.append(torch.where(best == lowest, -1, 0xFFFFFFFF - (best & 0xFFFFFFFF)))  # -1: fewer items than k
    return torch.cat(out_scores), torch.cat(out_ids)


def _chunk_keys(scores: torch.Tensor, i0: int, k: int) -> torch.Tensor:
    """A chunk's best ``k`` as keys. A float top-k is ten times cheaper than keying the whole
    block, but picks arbitrarily among scores equal to the k-th: such rows are keyed in full."""
    lowest = torch.iinfo(torch.int64).min
    kk = min(k, scores.shape[1])
    values, cols = torch.topk(scores, kk, dim=1)
    keys = _keys(values, cols + i0).masked_fill(values == -torch.inf, lowest)
    tied = ((scores >= values[:, -1:]).sum(1) > kk).nonzero(as_tuple=True)[0]
    if len(tied):
        block = scores[tied]
        ids = torch.arange(i0, i0 + block.shape[1]).expand_as(block)
        full = _keys(block, ids).masked_fill(block == -torch.inf, lowest)
        keys[tied] = torch.topk(full, kk, dim=1).values
    return keys


def _score_of(keys: torch.Tensor) -> torch.Tensor:
    """The float32 scores inside keys (exactly the computed values); NaN where no item was left."""
    high = (keys >> 32).to(torch.int32)
    scores = torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)
    return scores.masked_fill(keys == torch.iinfo(torch.int64).min, float("nan"))
