"""Dataset preparation (method.md section 1) and the prepared-dataset reader.

A prepared dataset is a folder:
  items.tsv       id, asin, title, image key (ids 1..N in items-file order; 0 = padding)
  users.tsv       user, space-separated item ids (oldest first, truncated)
  splits.npz      leave-one-out arrays, left-padded with 0
  popularity.npy  [N+1] train frequency p_i (p_0 = 0)
  meta.json       counts, settings, sources and input fingerprints (written last)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from iisan.config import check_section
from iisan.errors import DataError
from iisan.images import ImageSource
from iisan.outputs import check_replaceable, output_folder
from iisan.rawdata import read_items, read_users

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def left_pad(rows: list[list[int]], width: int) -> np.ndarray:
    """Keep the last ``width`` ids of each row, left-padded with 0.  (U, width)"""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-width:]
        if r:
            out[i, width - len(r) :] = r
    return out


def leave_one_out(seqs: list[list[int]], max_seq_len: int) -> dict[str, np.ndarray]:
    """train = seq[:-2]; valid target seq[-2]; test target seq[-1]; inputs = last
    ``max_seq_len`` items before the target. ``train`` keeps max_seq_len+1 items so
    every position has a next-item target."""
    return {
        "train": left_pad([s[:-2] for s in seqs], max_seq_len + 1),
        "valid_input": left_pad([s[:-2] for s in seqs], max_seq_len),
        "valid_target": np.array([s[-2] for s in seqs], dtype=np.int64),
        "test_input": left_pad([s[:-1] for s in seqs], max_seq_len),
        "test_target": np.array([s[-1] for s in seqs], dtype=np.int64),
        # history excluded from the ranking: train items for valid, seq[:-1] for test
        "valid_history": left_pad([s[:-2] for s in seqs], max_seq_len + 1),
        "test_history": left_pad([s[:-1] for s in seqs], max_seq_len + 2),
    }


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def prepare(
    items_path,
    users_path,
    out,
    images=None,
    missing_images: str = "error",
    min_len: int = 5,
    max_seq_len: int = 10,
    encoding: str = "utf-8",
    format: str = "amazon",
) -> dict:
    """Read raw files (Amazon TSVs, or MicroLens' titles CSV and pairs: iisan.microlens)
    and write a prepared dataset folder. Returns meta.

    The settings are checked against the schema's ``prepare`` definition (as
    config.yaml's are), and ``out`` before any work (see iisan.outputs)."""
    settings = {"missing_images": missing_images, "min_seq_len": min_len, "max_seq_len": max_seq_len,
                "encoding": encoding, "format": format}  # fmt: skip
    check_section("prepare", settings, "iisan prepare")
    check_replaceable(Path(out).absolute(), "prepared-dataset")
    if format == "microlens":
        from iisan.microlens import read_pairs, read_titles

        titles_by_asin = read_titles(items_path, encoding)
        users = read_pairs(users_path, titles_by_asin, encoding)
    else:
        titles_by_asin = read_items(items_path, encoding)
        users = read_users(users_path, known_items=titles_by_asin, encoding=encoding)

    keep_last = max_seq_len + 3  # train window (max_seq_len+1) + valid + test
    kept = [(u, s[-keep_last:]) for u, s in users if len(s) >= min_len]
    if not kept:
        raise DataError(
            users_path, f"no user has at least {min_len} items", "check the users file or lower `min_seq_len`"
        )
    used = {a for _, s in kept for a in s}
    asins = [a for a in titles_by_asin if a in used]  # items-file order
    ids = {a: i + 1 for i, a in enumerate(asins)}
    seqs = [[ids[a] for a in s] for _, s in kept]

    image_keys: list[str] = [""] * len(asins)
    image_digest = hashlib.sha256()
    n_missing = 0
    src = ImageSource(images) if images else None
    if src is not None:
        for i, a in enumerate(tqdm(asins, desc="checking images", unit="img", disable=None)):
            key = src.locate(a)
            if key is None:
                if missing_images == "error":
                    raise DataError(
                        src.path,
                        f"no image for item {a!r}",
                        "add {ASIN}.jpg, or set `missing_images: blank` to use a blank image",
                    )
                n_missing += 1
                image_digest.update(f"{a}:blank\0".encode())
                continue
            im = src.load(key)  # decodes: a broken file fails here, not mid-extraction
            image_digest.update(f"{a}:{im.size}:".encode() + hashlib.sha256(im.tobytes()).digest())
            image_keys[i] = key
        if n_missing:
            log.warning("%d of %d items have no image in %s; using blank images", n_missing, len(asins), src.path)

    splits = leave_one_out(seqs, max_seq_len)
    counts = np.bincount(splits["train"].ravel(), minlength=len(asins) + 1).astype(np.float64)
    counts[0] = 0.0
    popularity = counts / counts.sum()

    titles = [titles_by_asin[a] for a in asins]  # one line each (rawdata.clean_text)
    meta = {
        "format_version": FORMAT_VERSION,
        "n_users": len(seqs),
        "n_items": len(asins),
        "n_interactions": int(sum(len(s) for s in seqs)),
        "min_seq_len": min_len,
        "max_seq_len": max_seq_len,
        "format": format,
        "sources": {"items": str(items_path), "users": str(users_path), "images": str(images) if images else None},
        "image_source_kind": src.kind if src else None,
        "missing_images": n_missing,
        "text_fingerprint": _sha(*asins, *titles),
        "sequences_fingerprint": _sha(*(" ".join(map(str, s)) for s in seqs)),
        "image_fingerprint": image_digest.hexdigest() if src else None,
    }

    with output_folder(out, "prepared-dataset") as tmp:
        with (tmp / "items.tsv").open("w", encoding="utf-8") as f:
            f.write("id\tasin\ttitle\timage\n")
            for i, (a, t, k) in enumerate(zip(asins, titles, image_keys, strict=True), start=1):
                f.write(f"{i}\t{a}\t{t}\t{k}\n")
        with (tmp / "users.tsv").open("w", encoding="utf-8") as f:
            for (u, _), s in zip(kept, seqs, strict=True):
                f.write(f"{u}\t{' '.join(map(str, s))}\n")
        np.savez(tmp / "splits.npz", **splits)
        np.save(tmp / "popularity.npy", popularity)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "prepared %s: %d users, %d items, %d interactions",
        out,
        meta["n_users"],
        meta["n_items"],
        meta["n_interactions"],
    )
    return meta


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
