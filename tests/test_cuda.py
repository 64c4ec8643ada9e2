"""CUDA paths, run where a GPU is (scripts/gpu-check runs `pytest -m cuda`); skipped elsewhere.
Each check compares runs on the device with each other or with values computed independently,
never with a constant that only holds on the CPU."""

import json
import signal
import subprocess
import time

import pytest
import torch

from iisan.extract.backbones import Backbone
from iisan.extract.specs import BackboneSpec, CaptionSpec

from conftest import QUICK, fit, iisan, iisan_started, read_json

pytestmark = pytest.mark.cuda
TITLES = ["a", "steel beaker 250 ml", "a glass pipette with a long name and many words to pad the batch out", "red"]
LAYERS = [0, 4, 8, 12, 16, 20, 24]


def test_streaming_on_the_gpu_holds_only_the_resident_weights_there(tiny):
    gptq = str(tiny["tiny-llama-gptq"])
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    b = Backbone(BackboneSpec(model=gptq, backend="torch", device_map="auto",
                              max_memory={0: "8.5MB", "cpu": "1GiB"}), "cuda")  # fmt: skip
    assert set(b.stream.homes.values()) == {"cpu"} and len(b.placement.resident) == 7
    homes = b.stream._state
    assert all(t.is_pinned() for state in homes.values() for t in state.values())  # copies overlap with compute
    held = torch.cuda.memory_allocated() - before
    assert b.placement.resident_bytes <= held < b.placement.resident_bytes + 2**20  # nothing streamed stays
    batches = [b.encode_inputs(TITLES[:2]), b.encode_inputs(TITLES[2:])]
    out = b.forward_batches(batches, LAYERS)
    assert torch.cuda.memory_allocated() - before < b.placement.resident_bytes + 2**20 + sum(o.nbytes for o in out)
    resident = Backbone(BackboneSpec(model=gptq, backend="torch"), "cuda")
    assert all(torch.equal(a, resident.forward(x, LAYERS)) for a, x in zip(out, batches, strict=True))


def test_training_on_the_gpu_is_bit_reproducible_and_quiet(small_demo, caches, tmp_path):
    _, data_dir = small_demo
    a = fit(data_dir, tmp_path / "a", caches, **QUICK, device="cuda")  # a warning would be an error here
    b = fit(data_dir, tmp_path / "b", caches, **QUICK, device="cuda")
    assert a["test"] == b["test"] and [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    sa, sb = (torch.load(tmp_path / r / "model.pt", weights_only=False)["state_dict"] for r in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a/ranks.npz").read_bytes() == (tmp_path / "b/ranks.npz").read_bytes()
    eff = read_json(tmp_path / "a/efficiency.json")
    assert eff["device"].startswith("cuda") and eff["peak_memory_kind"] == "cuda_max_allocated"


def test_a_killed_gpu_run_resumes_to_the_uninterrupted_metrics(small_demo, caches, tmp_path):
    _, data_dir = small_demo
    settings = json.dumps({**QUICK, "epochs": 6, "patience": 6, "device": "cuda"})
    args = ["train", "--data", data_dir, "--text-cache", caches["text"], "--settings", settings]
    p = iisan_started(*args, "--out", tmp_path / "run", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    log = tmp_path / "run/train.log"
    while time.time() < deadline and not (log.is_file() and "epoch   2" in log.read_text()):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / "run/resume.pt").is_file() and not (tmp_path / "run/metrics.json").exists()
    assert iisan(*args, "--out", tmp_path / "run").returncode == 0
    assert iisan(*args, "--out", tmp_path / "straight").returncode == 0
    resumed, straight = read_json(tmp_path / "run/metrics.json"), read_json(tmp_path / "straight/metrics.json")
    assert resumed["test"] == straight["test"] and resumed["history"] == [
        {
            **h,
            "train_seconds": r["train_seconds"],
            **({"eval_seconds": r["eval_seconds"]} if "eval_seconds" in h else {}),
        }
        for h, r in zip(straight["history"], resumed["history"], strict=True)
    ]


def test_embedded_evaluation_on_the_gpu_builds_no_graph_and_holds_less(tiny, small_demo):
    from iisan.data.prepared import PreparedData
    from iisan.train.loop import rank_all
    from iisan.train.model import Inputs, build
    from iisan.train.settings import ModelConfig

    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    specs = {"text": BackboneSpec(model=str(tiny["tiny-bert"])),
             "image": BackboneSpec(model=str(tiny["tiny-vit"]), modality="image")}  # fmt: skip
    model = build(ModelConfig(method="fft", d=16), data, Inputs.of(backbones=specs), torch.device("cuda"))
    sp = {k: torch.as_tensor(v[:256], device="cuda") for k, v in data.splits.items()}
    saved = []
    torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        rank_all(model, sp["valid_input"], sp["valid_target"], sp["valid_history"], 256)
    eval_peak = torch.cuda.max_memory_allocated()
    model.train()
    torch.cuda.reset_peak_memory_stats()
    model.embed_items(torch.arange(1, 257, device="cuda")).sum().backward()
    assert not saved and eval_peak < torch.cuda.max_memory_allocated()


def test_captioning_on_the_gpu_with_the_workflows_string_keys(tiny, tmp_path):
    from PIL import Image

    from iisan.extract.caption import Captioner
    from iisan.extract.tiny import build_tiny

    llava = build_tiny("tiny-llava", tiny["tiny-bert"].parent / "tiny-llava")
    entry = {"model": str(llava), "device_map": "auto", "max_memory": {"0": "2GiB", "cpu": "4GiB"},
             "offload_folder": str(tmp_path / "off"), "max_new_tokens": 4}  # fmt: skip
    spec = CaptionSpec.from_config(entry, "--captioner")
    cap = Captioner(spec, "cuda")
    assert next(cap.model.parameters()).device.type == "cuda"
    assert len(cap([[Image.new("RGB", (32, 32), (200, 30, 30))]] * 2, "Describe.")) == 2
