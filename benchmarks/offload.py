"""Offload before and after: accelerate's hooks (what iisan used to rely on) against iisan's
layer streaming, on the tiny 4-bit GPTQ Llama with most layers on disk, over Scientific titles.

Measured, not derived: the quantised weight buffers (``qweight``/``qzeros``/``scales``) of the
offloaded layers that hold memory between passes; the weight bytes actually copied (every
tensor accelerate's hooks or iisan's stream set from their store, counted as it is set); items/s.

    .venv/bin/python benchmarks/offload.py [--items 2048] [--out /tmp/iisan-bench]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCI = REPO.parent / "shared/data/amazon/scientific"
QUANT = ("qweight", "qzeros", "scales")


def before(gptq: Path, titles: list[str], folder: Path, batch: int) -> dict:
    """transformers + accelerate: device_map auto, the layers on disk, the hooks move what they move."""
    import accelerate.hooks
    import torch
    from transformers import AutoModel, AutoTokenizer

    moved = {"bytes": 0}
    real_set = accelerate.hooks.set_module_tensor_to_device

    def counting(module, name, device, value=None, **kw):
        if value is not None and str(device) != "meta":
            moved["bytes"] += value.numel() * value.element_size()
        return real_set(module, name, device, value=value, **kw)

    accelerate.hooks.set_module_tensor_to_device = counting
    model = AutoModel.from_pretrained(gptq, device_map="auto", max_memory={"cpu": "1MB"}, offload_folder=str(folder),
                                      dtype=torch.float16).eval()  # fmt: skip
    offloaded = [n for n, d in model.hf_device_map.items() if d == "disk"]
    tok = AutoTokenizer.from_pretrained(gptq)
    held = sum(t.device.type != "meta" for n, t in model.named_buffers() if n.endswith(QUANT))
    t = time.perf_counter()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for i in range(0, len(titles), batch):
            enc = tok(titles[i : i + batch], padding=True, truncation=True, max_length=30, return_tensors="pt")
            model(**enc, use_cache=False)
    passes = -(-len(titles) // batch)
    return {
        "offloaded": f"{offloaded} on disk",
        "quantised buffers held between passes": held,
        "weight bytes moved per pass": moved["bytes"] // passes,
        "items/s": len(titles) / (time.perf_counter() - t),
    }


def after(gptq: Path, titles: list[str], folder: Path, batch: int) -> dict:
    """iisan: 7 layers resident, 17 streamed from disk, one chunk of passes at a time."""
    from iisan.extract.backbones import Backbone
    from iisan.extract.batching import plan
    from iisan.extract.specs import BackboneSpec
    from iisan.extract.streaming import tensors

    b = Backbone(BackboneSpec(model=str(gptq), device_map="auto", max_memory={"cpu": "8.5MB"},
                              offload_folder=str(folder)))  # fmt: skip
    blocks = b._layer_modules()
    held = sum(t.device.type != "meta" for i in b.stream.homes for n, t in tensors(blocks[i]).items()
               if n.endswith(QUANT))  # fmt: skip
    t, passes = time.perf_counter(), 0
    for lo in range(0, len(titles), 1024):
        chunk = titles[lo : lo + 1024]
        batches = plan(b.token_lengths(chunk), batch)
        b.forward_batches([b.encode_inputs([chunk[p] for p in bt]) for bt in batches], [0, 4, 8, 12, 16, 20, 24])
        passes += len(batches)
    return {"offloaded": f"{len(b.stream.homes)} layers on disk", "quantised buffers held between passes": held,
            "weight bytes moved per pass": b.stream.moved_bytes // passes,
            "items/s": len(titles) / (time.perf_counter() - t)}  # fmt: skip


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="/tmp/iisan-bench")
    a = p.parse_args()
    from iisan.data.amazon import read_items
    from iisan.extract.tiny import build_tiny

    out = Path(a.out)
    gptq = build_tiny("tiny-llama-gptq", out / "tiny" / "tiny-llama-gptq")
    titles = list(read_items(SCI / "Industrial_and_Scientific_items.tsv").values())[: a.items]
    rows = {"before (accelerate hooks)": before(gptq, titles, out / "off-before", a.batch),
            "after (iisan streaming)": after(gptq, titles, out / "off-after", a.batch)}  # fmt: skip
    print(f"\n{a.items} Scientific titles, batch {a.batch}, tiny 4-bit GPTQ Llama (24 layers):")
    keys = list(next(iter(rows.values())))
    print("| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, r in rows.items():
        cells = [f"{v:.0f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"# reproduce: .venv/bin/python benchmarks/offload.py --items {a.items} --batch {a.batch}")


if __name__ == "__main__":
    main()
