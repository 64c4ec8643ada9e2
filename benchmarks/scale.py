"""Training and full-ranking evaluation over a catalogue far larger than memory would like:
a generated prepared dataset of 1,000,000 items and 200,000 users, and a cache of 7 taps x
1,024 wide in fp16 (14.3 GB on disk, written chunk by chunk through iisan's own cache
writer). One training epoch on a subset of users and a full-ranking evaluation of 10,000
users, each residency in its own process on 2 CPU threads: peak RSS, items/s and seconds
per phase. A second, 100,000-item catalogue (1.4 GB) that fits in memory compares
``host`` and ``disk`` with ``device`` residency per epoch.

    .venv/bin/python benchmarks/scale.py [--out /tmp/iisan-scale] [--items 1000000 --users 200000]

The generated files are kept under --out and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from children import answered, in_child, status_bytes

WIDTH, TAPS = 1024, 7


def make_dataset(root: Path, n_items: int, n_users: int, seed: int = 0) -> Path:
    """A prepared dataset written directly (the layout iisan.data.prepared reads): random
    sequences of 5-13 items drawn with a popularity skew."""
    import numpy as np

    from iisan.data.prepare import _sha, leave_one_out
    from iisan.data.prepared import FORMAT_VERSION

    data = root / "data"
    if (data / "meta.json").is_file():
        return data
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    asins = [f"S{i:08d}" for i in range(1, n_items + 1)]
    titles = [f"item {i}" for i in range(1, n_items + 1)]
    with (data / "items.tsv").open("w") as f:
        f.write("id\tasin\ttitle\timage\n")
        f.writelines(f"{i}\t{a}\t{t}\t\n" for i, (a, t) in enumerate(zip(asins, titles, strict=True), 1))
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.6
    weights /= weights.sum()
    lengths = rng.integers(5, 14, n_users)
    flat = rng.choice(n_items, size=int(lengths.sum()), p=weights) + 1
    seqs = np.split(flat, np.cumsum(lengths)[:-1])
    with (data / "users.tsv").open("w") as f:
        f.writelines(f"U{u:07d}\t{' '.join(map(str, s))}\n" for u, s in enumerate(seqs))
    splits = leave_one_out([s.tolist() for s in seqs], 10)
    np.savez(data / "splits.npz", **splits)
    counts = np.bincount(splits["train"].ravel(), minlength=n_items + 1).astype(np.float64)
    counts[0] = 0
    np.save(data / "popularity.npy", counts / counts.sum())
    meta = {"format_version": FORMAT_VERSION, "n_users": n_users, "n_items": n_items,
            "n_interactions": int(lengths.sum()), "min_seq_len": 5, "max_seq_len": 10, "format": "amazon",
            "sources": {"items": "generated", "users": "generated", "images": None}, "image_source_kind": None,
            "missing_images": 0, "text_fingerprint": _sha(*asins, *titles), "sequences_fingerprint": "generated",
            "image_fingerprint": None}  # fmt: skip
    (data / "meta.json").write_text(json.dumps(meta, indent=2))
    return data


def make_cache(root: Path, data: Path) -> Path:
    """A finished 7 x 1,024 fp16 cache of random rows for every item, through iisan's cache writer."""
    import numpy as np
    from tqdm import tqdm

    from iisan.data.prepared import PreparedData
    from iisan.extract import cache

    store = root / "cache.zarr"
    d = PreparedData.load(data)
    attrs = {"model": "generated", "revision": None, "weights": None, "modality": "text", "n_layers": 12,
             "layers": [0, 2, 4, 6, 8, 10, 12], "pooling": "mean", "hidden": WIDTH, "quantization": None,
             "dtype": "float16", "max_text_len": 30, "image_size": None, "field": "title",
             "input_fingerprint": d.meta["text_fingerprint"], "data_fingerprint": d.meta["text_fingerprint"],
             "n_items": d.n_items, "chunk_items": cache.CHUNK_ITEMS, "code": "benchmark"}  # fmt: skip
    writer = cache.CacheWriter(store, attrs, on_mismatch="rebuild")
    rng = np.random.default_rng(1)
    for c in tqdm([c for c in range(writer.n_chunks) if not writer.is_done(c)], desc="cache", unit="chunk"):
        lo, hi = writer.chunk_rows(c)
        writer.write_chunk(c, (0.1 * rng.standard_normal((hi - lo, TAPS, WIDTH), dtype=np.float32)).astype("float16"))
    return store


def child(job: dict) -> dict:
    """One residency: an epoch on ``train_users`` users, then ``eval_users`` users ranked over every item."""
    import torch

    from iisan.train import loop
    from iisan.train.model import Inputs
    from iisan.train.settings import from_settings

    torch.set_num_threads(2)
    mc, tc = from_settings({"epochs": 1, "batch_size": 64, "lr": 1e-3, "residency": job["residency"],
                            "eval_batch_size": 2048, "device": "cpu"})  # fmt: skip
    t = time.perf_counter()
    s = loop.setup(job["data"], mc, tc, Inputs.of({"text": job["store"]}))
    load = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    users = s.train_seqs[torch.randperm(len(s.train_seqs), generator=g)[: job["train_users"]]]
    s.model.train()
    t = time.perf_counter()
    for b in range(0, len(users), tc.batch_size):
        loop.step(s, users[b : b + tc.batch_size])
    train = time.perf_counter() - t
    sp, n = s.splits, job["eval_users"]
    t = time.perf_counter()
    loop.rank_all(s.model, sp["test_input"][:n], sp["test_target"][:n], sp["test_history"][:n], 2048)
    evaluate = time.perf_counter() - t
    return {"residency": s.model.sources.features.residency, "load_s": round(load, 1), "train_s": round(train, 1),
            "eval_s": round(evaluate, 1), "train_users_per_s": round(len(users) / train, 1),
            "eval_items_per_s": round((s.data.n_items + 1) / evaluate),
            "peak_rss_gib": round(status_bytes("VmHWM:") / 2**30, 2)}  # fmt: skip


def run(job: dict) -> dict:
    return in_child(__file__, job, {"OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/iisan-scale")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--train-users", type=int, default=10_000)
    p.add_argument("--eval-users", type=int, default=10_000)
    p.add_argument("--small-items", type=int, default=100_000)
    p.add_argument("--residencies", default="host,disk")
    p.add_argument("--child")
    a = p.parse_args()
    if answered(a, child):
        return
    out = Path(a.out)
    rows = []
    for name, n_items, residencies in (("large", a.items, a.residencies.split(",")),
                                       ("fits in memory", a.small_items, ["device", "host", "disk"])):  # fmt: skip
        root = out / f"{n_items}"
        data = make_dataset(root, n_items, a.users if name == "large" else a.users // 10)
        store = make_cache(root, data)
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        for r in residencies:
            job = {"data": str(data), "store": str(store), "residency": r, "train_users": a.train_users,
                   "eval_users": a.eval_users}  # fmt: skip
            rows.append({"catalogue": f"{n_items:,} items, cache {size / 2**30:.1f} GiB", **run(job)})
            print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in rows[0] if k != "catalogue"]
    print("\n| catalogue | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['catalogue']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    print(
        f"# reproduce: .venv/bin/python benchmarks/scale.py --out {a.out} --items {a.items} --users {a.users} "
        f"--train-users {a.train_users} --eval-users {a.eval_users} --small-items {a.small_items}"
    )


if __name__ == "__main__":
    main()
