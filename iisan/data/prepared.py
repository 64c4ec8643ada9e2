"""The prepared dataset every later stage reads, written by ``iisan.data.prepare``.

A prepared dataset is a folder:
  items.tsv       id, asin, title, image key (ids 1..N in items-file order; 0 = padding)
  users.tsv       user, space-separated item ids (oldest first, truncated)
  splits.npz      leave-one-out arrays, left-padded with 0
  popularity.npy  [N+1] train frequency p_i (p_0 = 0)
  meta.json       counts, settings, sources and input fingerprints (written last)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from iisan.core.errors import DataError
from iisan.data.images import ImageSource

FORMAT_VERSION = 1


def left_pad(rows: list[list[int]], width: int) -> np.ndarray:
    """Keep the last ``width`` ids of each row, left-padded with 0.  (U, width)"""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-width:]
        if r:
            out[i, width - len(r) :] = r
    return out


@dataclass
class PreparedData:
    """A prepared dataset in memory. Item arrays are indexed by id (0 = padding)."""

    root: Path
    meta: dict
    asins: list[str]
    titles: list[str]
    image_keys: list[str]
    splits: dict[str, np.ndarray]
    popularity: np.ndarray

    @property
    def n_items(self) -> int:
        return self.meta["n_items"]

    @property
    def max_len(self) -> int:
        """Model input length (items before a target)."""
        return self.meta["max_seq_len"]

    @cached_property
    def ids_by_asin(self) -> dict[str, int]:
        """Each item's id by its ASIN (what new users' histories name)."""
        return {a: i for i, a in enumerate(self.asins) if i}

    @property
    def has_images(self) -> bool:
        return self.meta["sources"]["images"] is not None

    def image_source(self) -> ImageSource | None:
        return ImageSource(self.meta["sources"]["images"]) if self.has_images else None

    @classmethod
    def load(cls, root) -> PreparedData:
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise DataError(root, "not a prepared dataset (no meta.json)", "run `iisan prepare` first")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                meta_path,
                f"prepared with format {meta.get('format_version')}, this iisan reads {FORMAT_VERSION}",
                "re-run `iisan prepare`",
            )
        asins, titles, keys = [""], [""], [""]
        with (root / "items.tsv").open(encoding="utf-8") as f:
            next(f)
            for line in f:
                _, a, t, k = line.rstrip("\n").split("\t")
                asins.append(a)
                titles.append(t)
                keys.append(k)
        with np.load(root / "splits.npz") as z:
            splits = {k: z[k] for k in z.files}
        return cls(root, meta, asins, titles, keys, splits, np.load(root / "popularity.npy"))
