"""The GPU check behind ``scripts/gpu-check``: one command that exercises iisan's CUDA paths and
prints what it measured, at most ~8 minutes on one GPU.

1. the tests marked ``cuda`` (extraction, training determinism, resume, embedded-baseline
   evaluation, captioning);
2. a random Llama of Llama-3-70B's layer width (hidden 8192, MLP 28672, 4 layers), quantised to
   4-bit GPTQ on the GPU, extracted with ``max_memory`` forcing two layers to stream: peak GPU
   memory, weight bytes streamed (counted) beside the planner's prediction, items/s;
3. the same model resident (no offload): the same cache bit for bit, and its figures;
4. two same-seed training runs on that cache, compared byte for byte.

``--cpu`` runs every step on the CPU with tiny sizes (the test suite does: tests/test_gpu_check.py).
Writes the figures as JSON (``--out``) and exits 1 if a check failed.

    scripts/gpu-check                 # on a GPU machine
    scripts/gpu-check --cpu --out gpu-check-cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # the 70B's layer width on a GPU; a tiny Llama on the CPU
    "cuda": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                 num_hidden_layers=4, group_size=128, items=2000, users=3000),
    "cpu": dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=4, group_size=32, items=300, users=600),
}  # fmt: skip


def random_llama(out: Path, sizes: dict, seed: int = 0) -> Path:
    """A random Llama with these sizes and the tiny models' WordPiece tokenizer, saved in fp16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from iisan.extract.tiny import tokenizer

    torch.manual_seed(seed)
    tok = tokenizer()
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=64, pad_token_id=0, initializer_range=0.02,
                      tie_word_embeddings=True,
                      **{k: sizes[k] for k in keys})  # fmt: skip
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def step(results: dict, name: str):
    """Run one check, recording its figures or its failure; a failure does not stop the others."""

    def wrap(fn):
        t = time.perf_counter()
        try:
            figures = fn() or {}
            results[name] = {"status": figures.pop("status", "ok"), **figures}
        except Exception as e:
            results[name] = {"status": "FAILED", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t, 1)
        return fn

    return wrap


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU with tiny sizes")
    p.add_argument("--out", default="gpu-check.json", help="JSON of every figure")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    a = p.parse_args(argv)
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device here: run `scripts/gpu-check --cpu` for the CPU version", file=sys.stderr)
        return 2
    dev = "cpu" if a.cpu else "cuda"
    sizes = SIZES[dev]
    work = Path(a.work or tempfile.mkdtemp(prefix="iisan-gpu-check-"))
    results: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__}
    state: dict = {}

    @step(results, "cuda tests")
    def _():
        if dev == "cpu":
            return {"status": "skipped (no GPU)"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
        if r.returncode:
            raise RuntimeError(f"pytest -m cuda: {tail}\n{r.stdout[-3000:]}")
        return {"summary": tail}

    @step(results, "build 4-bit GPTQ Llama")
    def _():
        from iisan.data.prepare import prepare
        from iisan.data.synth import synthesize
        from iisan.extract.tiny import quantize

        fp = random_llama(work / "llama-fp16", sizes)
        state["gptq"] = work / "llama-gptq"
        state["gptq"].mkdir(exist_ok=True)
        quantize(fp, state["gptq"], device=dev, group_size=sizes["group_size"])
        raw = synthesize(work / "raw", n_items=sizes["items"], n_users=sizes["users"], seed=0)
        state["data"] = work / "data"
        prepare(raw["items"], raw["users"], state["data"])
        return {k: sizes[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}

    @step(results, "extract, 2 layers streamed")
    def _():
        from iisan.extract.backbones import Backbone
        from iisan.extract.backbones import plan as plan_backbone
        from iisan.extract.extraction import extract
        from iisan.extract.specs import BackboneSpec
        from iisan.extract.streaming import nbytes

        probe = Backbone(BackboneSpec(model=str(state["gptq"]), backend="torch"), dev)
        layers = [nbytes(b) for b in probe._layer_modules()]
        fixed = nbytes(probe.model) - sum(layers)
        del probe
        key = "cpu" if dev == "cpu" else 0  # room for the embeddings and all but the last two layers
        spec = BackboneSpec(model=str(state["gptq"]), backend="torch", device_map="auto",
                            max_memory={key: fixed + sum(layers[:-2]) + 1024, **({"cpu": "64GiB"} if key == 0 else {})},
                            offload_folder=str(work / "offload"), batch_size=64)  # fmt: skip
        plan = plan_backbone(spec, device=dev, chunk_items=256, n_items=sizes["items"])
        state["streamed"] = work / "streamed.zarr"
        s = extract(state["data"], spec, {"n": 2}, state["streamed"], chunk_items=256, device=torch.device(dev))
        predicted = plan.placement.streamed_bytes * s["chunks_done_now"]
        if s["layers_streamed"] != 2 or abs(s["streamed_weight_bytes"] - predicted) > 0.02 * predicted:
            raise AssertionError(f"streamed {s['streamed_weight_bytes']} B over {s['layers_streamed']} layers; "
                                 f"the plan predicted {predicted} B over 2")  # fmt: skip
        return {"items_per_s": round(s["items_per_s"], 1), "peak_memory_mib": round(s["peak_memory_bytes"] / 2**20, 1),
                "peak_memory_kind": s["peak_memory_kind"], "streamed_mib": round(s["streamed_weight_bytes"] / 2**20, 2),
                "planned_mib": round(predicted / 2**20, 2), "layers_resident": s["layers_resident"],
                "layers_streamed": s["layers_streamed"], "passes": s["passes"]}  # fmt: skip

    @step(results, "extract, resident")
    def _():
        import numpy as np

        from iisan.extract import cache
        from iisan.extract.extraction import extract
        from iisan.extract.specs import BackboneSpec

        spec = BackboneSpec(model=str(state["gptq"]), backend="torch", batch_size=64)
        resident = work / "resident.zarr"
        s = extract(state["data"], spec, {"n": 2}, resident, chunk_items=256, device=torch.device(dev))
        same = np.array_equal(cache.load(resident)[0], cache.load(state["streamed"])[0])
        if not same:
            raise AssertionError("the streamed cache differs from the resident one")
        return {"items_per_s": round(s["items_per_s"], 1), "peak_memory_mib": round(s["peak_memory_bytes"] / 2**20, 1),
                "peak_memory_kind": s["peak_memory_kind"], "same_bytes_as_streamed": same}  # fmt: skip

    @step(results, "training twice, same seed")
    def _():
        from iisan.train.loop import train
        from iisan.train.model import Inputs
        from iisan.train.settings import from_settings

        settings = {"epochs": 2, "patience": 2, "batch_size": 64, "lr": 2e-3, "lr_san": 2e-3, "seed": 7, "device": dev}
        runs = [train(state["data"], work / f"run{i}", *from_settings(settings), Inputs.of({"text": state["streamed"]}))
                for i in (1, 2)]  # fmt: skip
        a, b = (torch.load(work / f"run{i}/model.pt", weights_only=False)["state_dict"] for i in (1, 2))
        same = all(torch.equal(a[k], b[k]) for k in a) and runs[0]["test"] == runs[1]["test"]
        ranks = (work / "run1/ranks.npz").read_bytes() == (work / "run2/ranks.npz").read_bytes()
        if not (same and ranks):
            raise AssertionError("two same-seed runs differ")
        return {"same_weights_and_ranks": True, "test_HR@10": runs[0]["test"]["HR@10"],
                "device": str(json.loads((work / "run1/efficiency.json").read_text())["device"])}  # fmt: skip

    _report(results, Path(a.out))
    return 1 if any(isinstance(v, dict) and v["status"] == "FAILED" for v in results.values()) else 0


def _report(results: dict, out: Path) -> None:
    print(f"\niisan GPU check on {results['device']} (torch {results['torch']})")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        figures = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("status", "seconds", "trace", "error"))
        print(f"  {name:<28} {r['status']:<18} {r['seconds']:>7.1f}s  {figures}")
        if r["status"] == "FAILED":
            print("    " + r["error"].replace("\n", "\n    "))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures: {out}   (rerun: scripts/gpu-check{' --cpu' if results['device'] == 'cpu' else ''})")


if __name__ == "__main__":
    raise SystemExit(main())
