"""Quality and speed on real data: the Scientific titles (no images) with the
real MiniLM text cache. Trains text-only IISAN, the frozen-backbone model
(Linear head on MiniLM's last layer) and ID-based SASRec with the same settings,
and prints test HR@10/NDCG@10 (best valid epoch) and training seconds/epoch.
Needs the cache from benchmarks/extract_minilm.py (same --out).

    .venv/bin/python benchmarks/scientific_text.py [--epochs 40] [--lr 1e-3] [--out /tmp/iisan-bench]
"""

import argparse
import json
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--methods", default="iisan,frozen,id,pop")
    ap.add_argument("--out", default="/tmp/iisan-bench")
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from iisan.train import TrainConfig, train

    out = Path(a.out)
    data, store = out / "scientific-data", out / "minilm.zarr"
    rows = {}
    for method in a.methods.split(","):
        cfg = TrainConfig(
            method=method, epochs=a.epochs, patience=a.patience, lr=a.lr, lr_san=a.lr, batch_size=a.batch_size
        )
        m = train(data, out / f"run-{method}", cfg, text_cache=None if method in ("id", "pop") else store)
        eff = json.loads((out / f"run-{method}/efficiency.json").read_text())
        rows[method] = {
            "test_HR@10_%": round(100 * m["test"]["HR@10"], 2),
            "test_NDCG@10_%": round(100 * m["test"]["NDCG@10"], 2),
            "valid_HR@10_%": round(100 * m["valid"]["HR@10"], 2),
            "best_epoch": m["best_epoch"],
            "epochs_run": m["epochs_run"],
            "s_per_epoch": round(eff["seconds_per_epoch"], 2),
            "peak_rss_mib": round(eff["peak_memory_bytes"] / 2**20),
            "trainable_params": eff["trainable_parameters"],
        }
        print(json.dumps({method: rows[method]}), flush=True)
    print(json.dumps(rows, indent=2))
    print(
        f"# reproduce: .venv/bin/python benchmarks/scientific_text.py --epochs {a.epochs} --patience {a.patience} "
        f"--lr {a.lr} --batch-size {a.batch_size}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
