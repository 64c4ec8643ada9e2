"""Dataset preparation (method.md section 1): raw files -> a prepared dataset folder
(``iisan.data.prepared``). Users with fewer than ``min_seq_len`` items are dropped,
each keeps its last ``max_seq_len + 3`` (the Amazon rule; ``truncate: false`` keeps
every interaction, as MicroLens-100K is published), items are numbered in
items-file order, sequences split leave-one-out, and training popularity counted
over every training interaction kept, for the loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from iisan.core.errors import DataError
from iisan.core.outputs import check_replaceable, output_folder
from iisan.core.schema import parse, setting
from iisan.data.amazon import read_items, read_users
from iisan.data.images import ImageSource
from iisan.data.prepared import FORMAT_VERSION, left_pad

log = logging.getLogger(__name__)


@dataclass
class PrepareSettings:
    """How raw files become a prepared dataset (a dataset's settings in config.yaml)."""

    format: Literal["amazon", "microlens"] = setting(
        "amazon", "raw layout: amazon (items/users TSVs) or microlens (titles CSV, pairs TSV/CSV, covers zip or folder)"
    )
    missing_images: Literal["error", "blank"] = setting(
        "error", "an item without an image: error, or a blank image (counted, warned)"
    )
    encoding: str = setting("utf-8", "text encoding of the raw files (a UTF-8 byte-order mark is always accepted)")
    min_seq_len: int = setting(
        5, "drop users with fewer items (>= 3: train, valid and test need one each)", minimum=3, maximum=10000
    )
    max_seq_len: int = setting(
        10, "model input length; the last max_seq_len + 3 items are kept (see truncate)", minimum=1, maximum=1000
    )
    truncate: bool = setting(
        True,
        "keep each user's last max_seq_len + 3 items only (the Amazon datasets); false keeps every "
        "interaction in the catalogue and the popularity (MicroLens-100K's 719,405); inputs stay max_seq_len",
    )


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


def _absolute(path) -> str:
    return str(Path(path).resolve())


def _read_raw(items_path, users_path, ps: PrepareSettings):
    """(ASIN -> title in file order, [(user, [ASIN, ...])]) from the raw layout."""
    if ps.format == "microlens":
        from iisan.data.microlens import read_pairs, read_titles

        titles = read_titles(items_path, ps.encoding)
        return titles, read_pairs(users_path, titles, ps.encoding)
    titles = read_items(items_path, ps.encoding)
    return titles, read_users(users_path, known_items=titles, encoding=ps.encoding)


def _check_images(src: ImageSource, asins: list[str], missing_images: str) -> tuple[list[str], str, int]:
    """Each item's image key ('' = none), the images' fingerprint and how many are missing.
    The fingerprint is of the stored bytes, read but not decoded (decoding a million JPEGs
    takes hours; extraction decodes them, in parallel); a file that does not even open as
    an image fails here."""
    keys, digest, n_missing = [""] * len(asins), hashlib.sha256(), 0
    for i, a in enumerate(tqdm(asins, desc="checking images", unit="img", disable=None)):
        key = src.locate(a)
        if key is None:
            if missing_images == "error":
                raise DataError(src.path, f"no image for item {a!r}",
                                "add {ASIN}.jpg, or set `missing_images: blank` to use a blank image")  # fmt: skip
            n_missing += 1
            digest.update(f"{a}:blank\0".encode())
            continue
        raw = src.read_bytes(key)
        src.check_header(key, raw)
        digest.update(f"{a}:".encode() + hashlib.sha256(raw).digest())
        keys[i] = key
    if n_missing:
        log.warning("%d of %d items have no image in %s; using blank images", n_missing, len(asins), src.path)
    return keys, digest.hexdigest(), n_missing


def prepare(items_path, users_path, out, images=None, **settings) -> dict:
    """Read raw files (Amazon TSVs, or MicroLens' titles CSV and pairs: iisan.data.microlens)
    and write a prepared dataset folder. ``settings`` are ``PrepareSettings`` fields,
    validated as config.yaml's are; ``out`` is checked before any work (iisan.core.outputs).
    Returns meta."""
    ps = parse(PrepareSettings, settings, "iisan prepare")
    check_replaceable(Path(out).absolute(), "prepared-dataset")
    titles_by_asin, users = _read_raw(items_path, users_path, ps)

    keep_last = ps.max_seq_len + 3 if ps.truncate else None  # train window (max_seq_len+1) + valid + test
    kept = [(u, s[-keep_last:] if keep_last else s) for u, s in users if len(s) >= ps.min_seq_len]
    if not kept:
        raise DataError(users_path, f"no user has at least {ps.min_seq_len} items",
                        "check the users file or lower `min_seq_len`")  # fmt: skip
    used = {a for _, s in kept for a in s}
    asins = [a for a in titles_by_asin if a in used]  # items-file order
    ids = {a: i + 1 for i, a in enumerate(asins)}
    seqs = [[ids[a] for a in s] for _, s in kept]
    src = ImageSource(images) if images else None
    image_keys, image_fp, n_missing = _check_images(src, asins, ps.missing_images) if src else ([""] * len(asins),
                                                                                                None, 0)  # fmt: skip

    splits = leave_one_out(seqs, ps.max_seq_len)
    # every training interaction (the train windows alone when truncated: they then hold them all)
    counts = np.bincount(np.concatenate([s[:-2] for s in seqs]), minlength=len(asins) + 1).astype(np.float64)
    counts[0] = 0.0
    titles = [titles_by_asin[a] for a in asins]  # one line each (amazon.clean_text)
    meta = {
        "format_version": FORMAT_VERSION,
        "n_users": len(seqs),
        "n_items": len(asins),
        "n_interactions": int(sum(len(s) for s in seqs)),
        **{k: v for k, v in asdict(ps).items() if k in ("min_seq_len", "max_seq_len", "format", "truncate")},
        # absolute: every later stage reads the same files from whatever folder it runs in
        "sources": {
            "items": _absolute(items_path),
            "users": _absolute(users_path),
            "images": _absolute(images) if images else None,
        },
        "image_source_kind": src.kind if src else None,
        "missing_images": n_missing,
        "text_fingerprint": _sha(*asins, *titles),
        "sequences_fingerprint": _sha(*(" ".join(map(str, s)) for s in seqs)),
        "image_fingerprint": image_fp,
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
        np.save(tmp / "popularity.npy", counts / counts.sum())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("prepared %s: %d users, %d items, %d interactions", out, meta["n_users"], meta["n_items"],
             meta["n_interactions"])  # fmt: skip
    return meta
