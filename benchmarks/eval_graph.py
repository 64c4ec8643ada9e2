"""Evaluation with and without an autograd graph: FFT (its backbones train, so before the fix
its evaluation re-enabled gradients inside ``rank_all``'s no_grad) against cached IISAN, on the
generated demo with tiny BERT + ViT. Each row runs in its own process; peak memory is RSS above
the process just before ranking (VmHWM, glibc's heap bypassed so freed memory is given back).

    .venv/bin/python benchmarks/eval_graph.py [--items 1000 --users 3000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from children import answered, in_child, status_bytes


def child(job: dict) -> dict:
    import torch

    from iisan.data.prepared import PreparedData
    from iisan.extract.backbones import Backbone
    from iisan.extract.specs import BackboneSpec
    from iisan.train.loop import rank_all
    from iisan.train.model import Inputs, build
    from iisan.train.settings import ModelConfig

    if job["mode"] == "before":  # the old rule: a trainable backbone built a graph whatever the caller's mode
        forward = Backbone.forward

        def old(self, inputs, layers, trainable=False):
            with torch.set_grad_enabled(trainable):
                return forward(self, inputs, layers, trainable)

        Backbone.forward = old
    data = PreparedData.load(job["data"])
    tiny = Path(job["tiny"])
    if job["method"] == "fft":
        specs = {"text": BackboneSpec(model=str(tiny / "tiny-bert")),
                 "image": BackboneSpec(model=str(tiny / "tiny-vit"), modality="image")}  # fmt: skip
        inputs = Inputs.of(backbones=specs)
    else:
        inputs = Inputs.of(caches=job["caches"])
    model = build(ModelConfig(method=job["method"]), data, inputs, torch.device("cpu"))
    sp = {k: torch.as_tensor(v) for k, v in data.splits.items()}
    rank_all(model, sp["valid_input"][:8], sp["valid_target"][:8], sp["valid_history"][:8], 2048)  # warm up
    Path("/proc/self/clear_refs").write_text("5")
    base, t = status_bytes("VmRSS:"), time.perf_counter()
    rank_all(model, sp["valid_input"], sp["valid_target"], sp["valid_history"], 2048)
    return {"seconds": round(time.perf_counter() - t, 2), "peak_mib": round((status_bytes("VmHWM:") - base) / 2**20, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--out", default="/tmp/iisan-bench-eval")
    p.add_argument("--child")
    a = p.parse_args()
    if answered(a, child):
        return
    from iisan.data.prepare import prepare
    from iisan.data.synth import synthesize
    from iisan.extract.extraction import extract
    from iisan.extract.specs import BackboneSpec
    from iisan.extract.tiny import build_tiny

    out = Path(a.out)
    tiny = {k: build_tiny(k, out / "tiny" / k) for k in ("tiny-bert", "tiny-vit")}
    data = out / "data"
    if not (data / "meta.json").is_file():
        raw = synthesize(out / "raw", n_items=a.items, n_users=a.users, seed=0)
        prepare(raw["items"], raw["users"], data, images=raw["images"])
    caches = {"text": str(out / "t.zarr"), "image": str(out / "v.zarr")}
    extract(data, BackboneSpec(model=str(tiny["tiny-bert"])), {}, caches["text"], on_mismatch="rebuild")
    extract(
        data, BackboneSpec(model=str(tiny["tiny-vit"]), modality="image"), {}, caches["image"], on_mismatch="rebuild"
    )
    rows = []
    for method in ("fft", "iisan"):
        for mode in ("before", "after"):
            job = {"method": method, "mode": mode, "data": str(data), "tiny": str(out / "tiny"), "caches": caches}
            rows.append({"method": method, "mode": mode,
                         **in_child(__file__, job, {"MALLOC_MMAP_THRESHOLD_": "65536"})})  # fmt: skip
    print(f"\nrank_all over the {a.users} valid users x {a.items} items, 2 CPU threads:")
    print("| method | eval seconds before → after | peak RSS MiB before → after |\n|---|---|---|")
    for method in ("fft", "iisan"):
        bf, af = (next(r for r in rows if r["method"] == method and r["mode"] == m) for m in ("before", "after"))
        print(f"| {method} | {bf['seconds']} → {af['seconds']} | {bf['peak_mib']} → {af['peak_mib']} |")
    print(f"# reproduce: .venv/bin/python benchmarks/eval_graph.py --items {a.items} --users {a.users}")


if __name__ == "__main__":
    main()
