"""Use a trained run: top-K recommendations and embeddings.

Users are scored against every item by dot product in chunks of users and of
items, keeping a running top-K (iisan.train.metrics.top_k), so memory stays
bounded for catalogues of millions of items, and ties go to the lower item id.

Whose recommendations: ``test`` users as at test time (their history up to the
test target, which is hidden: the share of users whose target is in their top-K
is the test HR@K), ``next`` for every user after their whole known sequence,
a file of user ids (as ``next``), or new histories given as ASIN sequences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iisan.core.errors import ConfigError, DataError
from iisan.core.outputs import atomic_file, atomic_write
from iisan.data.prepared import PreparedData, left_pad
from iisan.train.metrics import ITEM_BLOCK, USER_BLOCK, top_k
from iisan.train.model import item_embeddings, user_embeddings

log = logging.getLogger(__name__)


@dataclass
class Users:
    """Whom to recommend for: names, model inputs (U, L) and items to leave out (U, H), 0-padded."""

    names: list[str]
    inputs: torch.Tensor
    exclude: torch.Tensor


def read_sequences(data: PreparedData) -> list[tuple[str, list[int]]]:
    rows = []
    with (Path(data.root) / "users.tsv").open(encoding="utf-8") as f:
        for line in f:
            user, seq = line.rstrip("\n").split("\t")
            rows.append((user, [int(i) for i in seq.split()]))
    return rows


def select_users(data: PreparedData, which: str = "test", histories=None) -> Users:
    """``which``: ``test``, ``next`` or a file of user ids (one per line); ``histories``: a TSV of
    ``name<TAB>ASIN ASIN ...`` for users the model never saw (overrides ``which``)."""
    if histories is not None:
        rows = _read_histories(data, histories)
    elif which == "test":
        sp = data.splits
        names = [u for u, _ in read_sequences(data)]
        return Users(names, torch.as_tensor(sp["test_input"]), torch.as_tensor(sp["test_history"]))
    else:
        rows = read_sequences(data)
        if which != "next":
            rows = _pick_users(data, rows, which)
    seqs = [s for _, s in rows]
    return Users([u for u, _ in rows], torch.as_tensor(left_pad(seqs, data.max_len)),
                 torch.as_tensor(left_pad(seqs, max(map(len, seqs)))))  # fmt: skip


def _read_histories(data: PreparedData, histories) -> list[tuple[str, list[int]]]:
    index = data.ids_by_asin
    rows = []
    for no, line in enumerate(Path(histories).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        name, _, items = line.partition("\t")
        unknown = [a for a in items.split() if a not in index]
        if unknown or not items.split():
            what = f"ASIN(s) {unknown[:5]} not in the catalogue" if unknown else "no items"
            raise DataError(histories, f"history {name!r} has {what}",
                            "give `name<TAB>ASIN ASIN ...` with items of the run's dataset", line=no)  # fmt: skip
        rows.append((name, [index[a] for a in items.split()]))
    return rows


def _pick_users(data: PreparedData, rows, which) -> list[tuple[str, list[int]]]:
    if not Path(which).is_file():
        raise DataError(which, "not `test`, `next` or a file of user ids", "give --users test|next|FILE")
    by_name = dict(rows)
    wanted = [w.strip() for w in Path(which).read_text(encoding="utf-8-sig").splitlines() if w.strip()]
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise DataError(which, f"{len(unknown)} user id(s) not in the run's dataset, e.g. {unknown[:3]}",
                        f"list user ids of {data.root}/users.tsv, or give new users as --histories")  # fmt: skip
    return [(w, by_name[w]) for w in wanted]


def recommend(run_dir, k: int | None = None, which: str = "test", histories=None, keep_history: bool = False,
              data_dir=None, caches=None, device="cpu", user_chunk: int = USER_BLOCK,
              item_chunk: int = ITEM_BLOCK):  # fmt: skip
    """Top-``k`` recommendations of a trained run: a DataFrame with one row per (user, rank):
    user, rank (1-based), item_id, asin, score, title."""
    import pandas as pd

    from iisan.use.trained import load_run

    if k is not None and k < 1:
        raise ConfigError(f"`k`={k}: recommend at least one item per user\n  fix: give --k 1 or more")
    model, data, ckpt = load_run(run_dir, data_dir=data_dir, caches=caches, device=device)
    k = k or ckpt["train_config"]["metric_k"]  # by default the run's own cut-off
    if k > data.n_items:
        log.warning("k=%d is more than the %d items of the catalogue: at most %d per user", k, data.n_items,
                    data.n_items)  # fmt: skip
    users = select_users(data, which, histories)
    # each item encoded once, in the run's evaluation batches (encoding 65,536 items of 7 LLM taps at once
    # would hold gigabytes), histories looked up in the table
    table = item_embeddings(model, ckpt["train_config"]["eval_batch_size"], float32=False)
    u = user_embeddings(model, users.inputs, user_chunk, items=table).cpu()
    items = table.float().cpu()
    scores, ids = top_k(u, items, None if keep_history else users.exclude, k, user_chunk, item_chunk)
    n, kk = ids.shape
    flat = ids.reshape(-1).numpy()
    ok = flat >= 0
    asins, titles = np.asarray(data.asins, dtype=object), np.asarray(data.titles, dtype=object)
    frame = pd.DataFrame({
        "user": np.repeat(np.asarray(users.names, dtype=object), kk),
        "rank": np.tile(np.arange(1, kk + 1), n),
        "item_id": flat,
        "asin": np.where(ok, asins[np.where(ok, flat, 0)], ""),
        "score": scores.reshape(-1).numpy(),
        "title": np.where(ok, titles[np.where(ok, flat, 0)], ""),
    })  # fmt: skip
    empty = [name for name, row in zip(users.names, ids.numpy(), strict=True) if row[0] < 0]
    if empty:  # their history is the whole catalogue: nothing is left to recommend
        log.warning("%d user(s) have nothing left to recommend (their history holds every item): %s", len(empty),
                    ", ".join(empty[:20]) + (" ..." if len(empty) > 20 else ""))  # fmt: skip
    return frame[ok].reset_index(drop=True)


def write_table(frame, path) -> Path:
    """A DataFrame to ``.tsv`` or ``.parquet`` (by suffix), atomically."""
    path = Path(path)
    if path.suffix == ".parquet":
        return atomic_write(path, lambda p: frame.to_parquet(p, index=False))
    if path.suffix == ".tsv":
        return atomic_write(path, lambda p: frame.to_csv(p, sep="\t", index=False))
    raise DataError(path, f"unknown output format {path.suffix!r}", "name the output *.tsv or *.parquet")


def export_embeddings(run_dir, out, which: str | None = None, histories=None, data_dir=None, caches=None,
                      device="cpu", index: str | None = None) -> dict:  # fmt: skip
    """Every item's embedding (``items.npy``, N x d float32, row i = item id i + 1, with
    ``items.tsv``: row, item_id, asin) and, when asked, users' (``users.npy`` + ``users.tsv``),
    ready for an approximate-nearest-neighbour index: scores are plain dot products.
    ``index="faiss"`` also writes one (``items.faiss``, iisan.use.index) with its recall@10
    against the exact top-10 of the test users (``index.json``)."""
    if index not in (None, "faiss"):
        raise ConfigError(f"--index {index!r}: the index kind iisan writes is faiss")
    import pandas as pd

    from iisan.use.trained import load_run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, data, ckpt = load_run(run_dir, data_dir=data_dir, caches=caches, device=device)
    encoded = item_embeddings(model, ckpt["train_config"]["eval_batch_size"], float32=False)
    items = encoded.float().cpu().numpy()[1:]
    atomic_file(out / "items.npy", lambda f: np.save(f, items))
    ids = np.arange(1, len(items) + 1)
    table = pd.DataFrame({"row": ids - 1, "item_id": ids, "asin": data.asins[1:]})
    write_table(table, out / "items.tsv")
    written = {"items": str(out / "items.npy"), "shape": list(items.shape)}
    if which is not None or histories is not None:
        users = select_users(data, which or "test", histories)
        u = user_embeddings(model, users.inputs, USER_BLOCK, items=encoded).cpu().numpy()
        atomic_file(out / "users.npy", lambda f: np.save(f, u))
        write_table(pd.DataFrame({"row": np.arange(len(u)), "user": users.names}), out / "users.tsv")
        written["users"] = str(out / "users.npy")
    if index:
        from iisan.use import index as ann

        test = select_users(data, "test")
        u = user_embeddings(model, test.inputs, USER_BLOCK, items=encoded).cpu()
        exact, _ = top_k(u, encoded.float().cpu(), None, 10)  # what an index cannot know: no history left out
        info = written["index"] = ann.write(ann.build(items), items, u.numpy(), exact.numpy(), out)
        log.info("faiss index of %d items: recall@10 %.4f against the exact top-10 of %d test users at efSearch %d, "
                 "%.3f ms a query", len(items), info["recall@10"], len(u), info["efSearch"],
                 info["ms_per_query"])  # fmt: skip
    return written
