"""An approximate-nearest-neighbour index of a run's item embeddings (faiss HNSW), for
serving top-K by inner product (the score iisan ranks by), and its recall against the
exact top-K.

HNSW searches a metric space; inner products are not one (on the demo an inner-product
HNSW plateaus at 0.95 recall@10 whatever its search breadth). So each item x is indexed as
[x, sqrt(M - |x|^2)] with M the largest |x|^2, a query q as [q, 0]: the nearest item in L2
is then the one of largest q.x (Bachrach et al., 2014), and q.x = (|q|^2 + M - d^2) / 2.
Row i of the index is item id i + 1 (item 0 is padding). A search knows nothing of a
user's history: ``search`` asks for k plus the history's length and drops the history.

The search breadth (efSearch) is chosen when the index is written: the smallest of
``EF_STEPS`` whose recall@10 on a sample of test users reaches ``TARGET_RECALL`` (items
whose norms spread widely need more: the added coordinate then dominates the distances).
Recall counts a returned item as right when its exact score reaches the exact k-th
score, so among items tied with the k-th (duplicate titles embed alike) any one is right.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iisan.core.errors import ConfigError
from iisan.core.outputs import atomic_file, atomic_json

HNSW_M, EF_CONSTRUCTION = 32, 200  # faiss' HNSW: links per node, build breadth
EF_STEPS = (64, 128, 256, 512, 1024, 2048, 4096)  # search breadths tried, cheapest first
TARGET_RECALL, TUNE_USERS = 0.95, 2000  # recall@10 the search breadth is chosen for, on this many test users


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - pinned in requirements.txt
        raise ConfigError("the ANN index needs faiss: pip install faiss-cpu (pinned in requirements.txt)") from e
    return faiss


@dataclass
class Index:
    hnsw: object  # a faiss.IndexHNSWFlat over the augmented items
    max_sq_norm: float

    @property
    def ntotal(self) -> int:
        return int(self.hnsw.ntotal)


def build(items: np.ndarray, ef_search: int = EF_STEPS[0]) -> Index:
    """An index over ``items`` (N x d float32, row i = item id i + 1)."""
    faiss = _faiss()
    items = np.asarray(items, dtype=np.float32)
    sq = (items.astype(np.float64) ** 2).sum(1)
    m = float(sq.max()) if len(sq) else 0.0
    augmented = np.ascontiguousarray(np.hstack([items, np.sqrt(np.maximum(m - sq, 0))[:, None]]), dtype=np.float32)
    index = faiss.IndexHNSWFlat(augmented.shape[1], HNSW_M)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.add(augmented)
    index.hnsw.efSearch = ef_search
    return Index(index, m)


def search(index: Index, users: np.ndarray, k: int, exclude: list[set[int]] | None = None):
    """(inner-product scores, item ids) of each user's top-``k`` by the index (ids -1 past the
    catalogue's end), leaving out each user's ``exclude`` item ids."""
    users = np.asarray(users, dtype=np.float32)
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    want = min(k + extra, index.ntotal)
    queries = np.ascontiguousarray(np.hstack([users, np.zeros((len(users), 1), np.float32)]))
    dist, rows = index.hnsw.search(queries, want)
    scores = ((users.astype(np.float64) ** 2).sum(1)[:, None] + index.max_sq_norm - dist) / 2
    out_s, out_i = np.full((len(users), k), np.nan, np.float32), np.full((len(users), k), -1, np.int64)
    for u in range(len(users)):
        keep = [(s, r + 1) for s, r in zip(scores[u], rows[u], strict=True) if r >= 0
                and not (exclude and r + 1 in exclude[u])][:k]  # fmt: skip
        if keep:
            out_s[u, : len(keep)], out_i[u, : len(keep)] = zip(*keep, strict=True)
    return out_s, out_i


def recall(index: Index, items: np.ndarray, users: np.ndarray, kth: np.ndarray, k: int) -> float:
    """The share of the index's top-``k`` whose exact score reaches ``kth``, each user's exact
    k-th score (``items``: N x d, row i = item id i + 1)."""
    return recall_of(search(index, users, k)[1], items, users, kth)


def recall_of(got: np.ndarray, items: np.ndarray, users: np.ndarray, kth: np.ndarray, block: int = 4096) -> float:
    """``recall`` of item ids already found (U x k, -1: none)."""
    hits = 0
    for u0 in range(0, len(users), block):
        u, t, g = users[u0 : u0 + block].astype(np.float64), kth[u0 : u0 + block, None], got[u0 : u0 + block]
        exact = np.einsum("ud,ukd->uk", u, items[np.maximum(g - 1, 0)].astype(np.float64))
        hits += int(((g > 0) & (exact >= t - 1e-6 * np.maximum(np.abs(t), 1))).sum())  # float32 vs float64
    return hits / max(got.size, 1)


def tune(index: Index, items: np.ndarray, users: np.ndarray, kth: np.ndarray, k: int,
         target: float = TARGET_RECALL) -> int:  # fmt: skip
    """Set and return the smallest search breadth of ``EF_STEPS`` whose recall@k on up to
    ``TUNE_USERS`` of ``users`` (a fixed random sample) reaches ``target`` (else the largest)."""
    pick = np.random.default_rng(0).permutation(len(users))[:TUNE_USERS]
    for ef in EF_STEPS:
        index.hnsw.hnsw.efSearch = ef
        if recall(index, items, users[pick], kth[pick], k) >= target:
            break
    return index.hnsw.hnsw.efSearch


def write(index: Index, items: np.ndarray, users: np.ndarray, exact_scores: np.ndarray, out: Path,
          k: int = 10) -> dict:  # fmt: skip
    """``out``/items.faiss and index.json: the index with its search breadth tuned (``tune``),
    its parameters, recall@k against the exact top-k scores of ``users`` (U x k, descending)
    and the time per query."""
    faiss = _faiss()
    kth = np.nan_to_num(np.asarray(exact_scores, np.float64)[:, k - 1], nan=-np.inf)  # NaN: fewer than k items
    ef = tune(index, items, users, kth, k)
    atomic_file(out / "items.faiss", lambda f: f.write(faiss.serialize_index(index.hnsw).tobytes()))
    t0 = time.perf_counter()
    _, found = search(index, users, k)
    seconds = time.perf_counter() - t0
    got = recall_of(found, items, users, kth)
    info = {"kind": "HNSW over L2 of MIPS-augmented items", "M": HNSW_M, "efConstruction": EF_CONSTRUCTION,
            "efSearch": ef, "target_recall": TARGET_RECALL, "tuned_on_users": min(TUNE_USERS, len(users)),
            "max_sq_norm": index.max_sq_norm, "n_items": index.ntotal, "dim": int(items.shape[1]),
            f"recall@{k}": got, "users": len(users), "ms_per_query": 1000 * seconds / max(len(users), 1)}  # fmt: skip
    atomic_json(out / "index.json", info)
    return info


def load(path) -> Index:
    """An index written by ``write`` (``items.faiss`` with its ``index.json`` beside it)."""
    faiss = _faiss()
    path = Path(path)
    meta = path.with_name("index.json")
    if not path.is_file() or not meta.is_file():
        raise ConfigError(f"{path}: no index here (items.faiss and index.json)\n"
                          "  fix: make one with `iisan embed --run RUN --out DIR --index faiss`")  # fmt: skip
    info = json.loads(meta.read_text())
    hnsw = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    hnsw.hnsw.efSearch = info["efSearch"]
    return Index(hnsw, info["max_sq_norm"])
