"""How stage one groups items into forward passes: by token length, under an item
cap and a padded-token budget; what that costs in padding; and the limits of one
extraction, halved on an accelerator out-of-memory under `batch_size: auto`."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

import torch

from iisan.core.errors import ExtractionError

log = logging.getLogger(__name__)

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


# how allocation failures read when they do not arrive as torch.OutOfMemoryError (cuBLAS, cuDNN, ROCm)
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "HIP_ERROR_OUT_OF_MEMORY")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an accelerator allocation failure."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MESSAGES)
    )


class BatchSizer:
    """The batch limits of one extraction: ``batch_size`` items (``auto``: start at
    1024 on an accelerator and halve on out-of-memory, keeping the smaller size) and
    an optional ``tokens_per_batch`` budget (on CPU, ``auto`` means a budget)."""

    def __init__(self, spec, device: torch.device):  # spec: a BackboneSpec
        self.auto = spec.batch_size == "auto"
        self.max_tokens = spec.tokens_per_batch
        if not self.auto:
            self.max_items = spec.batch_size
        elif device.type == "cpu":
            self.max_items, self.max_tokens = AUTO_START_ITEMS, self.max_tokens or AUTO_CPU_TOKENS
        else:
            self.max_items = AUTO_START_ITEMS
        if self.auto:
            log.info("batch_size auto: starting at %d items%s", self.max_items,
                     f", {self.max_tokens} tokens" if self.max_tokens else "")  # fmt: skip

    def plan(self, lengths: list[int]) -> list[list[int]]:
        return plan(lengths, self.max_items, self.max_tokens)

    def shrink(self, failed_items: int) -> None:
        """After an out-of-memory on a batch of ``failed_items``: halve, or explain."""
        if not self.auto or failed_items <= 1:
            raise ExtractionError(
                f"out of accelerator memory on a forward pass of {failed_items} item(s)",
                "set the backbone's `batch_size: auto` (or a smaller `batch_size` / `tokens_per_batch`); "
                "if one item does not fit, give the weights less GPU room in `max_memory`",
            )
        self.max_items = max(1, failed_items // 2)
        if self.max_tokens:
            self.max_tokens = max(1, self.max_tokens // 2)
        gc.collect()  # what the failed pass left in reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of memory at %d items per pass: batch_size auto now uses %d", failed_items, self.max_items)
