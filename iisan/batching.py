"""How stage one groups items into forward passes: by token length, under an item
cap and a padded-token budget, and what that costs in padding."""

from __future__ import annotations

from collections.abc import Sequence

AUTO_START_ITEMS = 1024  # `batch_size: auto` starts here on an accelerator and halves on out-of-memory
AUTO_CPU_TOKENS = 8192  # `batch_size: auto` on CPU (where out-of-memory cannot be caught) without a budget


def plan(lengths: Sequence[int], max_items: int, max_tokens: int | None = None) -> list[list[int]]:
    """Positions into ``lengths`` grouped into batches: sorted by length (stable, so
    equal lengths keep item order), each batch at most ``max_items`` long and, with a
    budget, at most ``max_tokens`` padded tokens (items × its longest); a single item
    longer than the budget still gets its own batch."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    for pos in order:
        b = batches[-1] if batches else None
        # ascending order: the item being added is the batch's longest
        if b and len(b) < max_items and (max_tokens is None or (len(b) + 1) * lengths[pos] <= max_tokens):
            b.append(pos)
        else:
            batches.append([pos])
    return batches


def padded_tokens(lengths: Sequence[int], batches: list[list[int]]) -> tuple[int, int]:
    """(real tokens, padded tokens incl. real) of a plan: each batch pads to its longest."""
    real = sum(lengths[p] for b in batches for p in b)
    padded = sum(len(b) * max(lengths[p] for p in b) for b in batches)
    return real, padded
