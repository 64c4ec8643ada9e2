"""Offloaded backbones really offload (iisan.extract.streaming): what is held where between
and during passes, the bytes that move counted as they move, the same taps as a resident
model bit for bit; the planner from model configs alone, against the config's arithmetic."""

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig

from iisan.core.errors import ConfigError, ModelLoadError
from iisan.extract.backbones import MODEL_CONFIGS, Backbone
from iisan.extract.backbones import plan as plan_backbone
from iisan.extract.planner import linear_bytes, place, sizes_from_config
from iisan.extract.specs import BackboneSpec
from iisan.extract.streaming import nbytes, tensors

from conftest import REPO, iisan

BUDGET = {"tiny-llama": "20MB", "tiny-llama-gptq": "8.5MB"}  # the embeddings and 7 of the 24 layers
TITLES = ["a", "steel beaker 250 ml", "a glass pipette with a long name and many words to pad the batch out", "red"]
LAYERS = [0, 4, 8, 12, 16, 20, 24]


def _spec(tiny, kind, **kw):
    return BackboneSpec(model=str(tiny[kind]), backend="torch" if kind.endswith("gptq") else None, **kw)


def _streamed(tiny, kind, tmp_path):
    return Backbone(_spec(tiny, kind, device_map="auto", max_memory={"cpu": BUDGET[kind]},
                          offload_folder=str(tmp_path / kind)))  # fmt: skip


@pytest.mark.parametrize("kind", ["tiny-llama-gptq", "tiny-llama"])
def test_streamed_layers_hold_nothing_between_passes_and_what_moves_is_counted(tiny, tmp_path, kind):
    b = _streamed(tiny, kind, tmp_path)
    homes, blocks = b.stream.homes, b._layer_modules()
    assert b.placement.resident == list(range(7)) and sorted(homes) == list(range(7, 24))
    assert set(homes.values()) == {"disk"}

    def held(i):  # the layer's tensors that hold memory (parameters and buffers alike)
        return [n for n, t in tensors(blocks[i]).items() if t.device.type != "meta"]

    assert not any(held(i) for i in homes)
    if kind.endswith("gptq"):  # GPTQ keeps its 4-bit weights as buffers: those must not stay behind
        q = [n for i in homes for n, _ in blocks[i].named_buffers() if n.endswith(("qweight", "qzeros", "scales"))]
        assert len(q) == 17 * 7 * 3
        assert all(t.device.type == "cpu" for i in b.placement.resident for t in tensors(blocks[i]).values())
    loaded = []  # how many streamed layers hold memory while each layer runs

    def count(m, args, i):
        if "forward" not in m.__dict__:  # a real run (the final norm's pass short-circuits the layers)
            loaded.append((i, sum(bool(held(j)) for j in homes)))

    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: count(m, a, i)) for i, blk in enumerate(blocks)]
    batches = [b.encode_inputs(TITLES[:2]), b.encode_inputs(TITLES[2:])]
    before = b.stream.moved_bytes
    out = b.forward_batches(batches, LAYERS)
    for h in hooks:
        h.remove()
    assert {n for i, n in loaded if i in homes} == {1} and {n for i, n in loaded if i not in homes} == {0}
    assert not any(held(i) for i in homes)  # released again
    # every streamed layer crossed once for both passes: the bytes of its file's tensors
    on_disk = 0
    for i in homes:
        with safe_open(str(tmp_path / kind / f"layer-{i:03d}.safetensors"), framework="pt") as f:
            on_disk += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    assert b.stream.moved_bytes - before == on_disk > 0 and b.stream.loads == 17
    # the same taps as the model loaded whole, bit for bit, and as transformers' hidden states
    resident = Backbone(_spec(tiny, kind))
    ref = [resident.forward(x, LAYERS) for x in batches]
    assert all(torch.equal(a, r) for a, r in zip(out, ref, strict=True))
    assert torch.equal(ref[1], resident.forward_hidden_states(batches[1], LAYERS))
    assert torch.equal(b.forward(batches[0], LAYERS), ref[0])  # one pass on its own too


def test_a_kernel_that_cannot_stream_is_refused_with_the_backend_to_use(tiny, tmp_path):
    spec = BackboneSpec(model=str(tiny["tiny-llama-gptq"]), backend="gptq_torch_aten", device_map="auto",
                        max_memory={"cpu": BUDGET["tiny-llama-gptq"]}, offload_folder=str(tmp_path / "x"))  # fmt: skip
    msg = (
        r"GPTQ kernel TorchAtenLinear \(backend gptq_torch_aten\) repacks.*\n  fix: set the backbone's `backend: torch`"
    )
    with pytest.raises(ConfigError, match=msg):
        Backbone(spec)
    Backbone(BackboneSpec(model=str(tiny["tiny-llama-gptq"]), backend="gptq_torch_aten"))  # resident: any kernel


def test_placement_fills_the_device_then_host_memory_then_disk():
    p = place(10, [4, 4, 4, 4, 4], device_budget=18, host_budget=5)
    assert p.resident == [0, 1] and p.homes == {2: "cpu", 3: "disk", 4: "disk"} and p.streamed_bytes == 12
    assert place(10, [4, 4], None, None).resident == [0, 1]  # no budget: everything on the device
    with pytest.raises(ConfigError, match=r"leaves no room for the embeddings and final norm \(10 B\)"):
        place(10, [4], device_budget=5, host_budget=None)


def test_gptq_layer_sizes_by_hand_and_from_the_config_equal_the_loaded_tensors(tiny):
    # a 4-bit group-128 linear 8192 -> 8192: packed weights, zero points, fp16 scales, int32 group index
    assert linear_bytes(8192, 8192, False, 2, {"bits": 4, "group_size": 128}) == (
        8192 * 8192 // 2 + 64 * 8192 // 2 + 64 * 8192 * 2 + 8192 * 4
    )
    for kind, dtype_bytes in (("tiny-llama-gptq", 2), ("tiny-llama", 4)):
        fixed, layers, facts = sizes_from_config(AutoConfig.from_pretrained(tiny[kind]), dtype_bytes)
        b = Backbone(_spec(tiny, kind))
        loaded = [nbytes(x) for x in b._layer_modules()]
        assert len(layers) == facts["n_layers"] == 24
        assert layers[0] == pytest.approx(loaded[0], rel=0.01), kind  # GPTQ's shift tables are the difference
        assert fixed == pytest.approx(nbytes(b.model) - sum(loaded), rel=0.01), kind


def test_the_70b_plan_is_the_configs_arithmetic():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    from iisan.pipeline.config import pipeline_only

    entry = {k: v for k, v in config["backbones"]["llama3-70b-gptq"].items() if k not in pipeline_only("backbone")}
    plan = plan_backbone(BackboneSpec(**entry), model_config=MODEL_CONFIGS / "llama3-70b-gptq",
                         device_memory="24GB")  # fmt: skip
    p = plan.placement
    assert plan.device == "cuda:0" and len(p.resident) == 43 and len(p.homes) == 37
    assert set(p.homes.values()) == {"cpu"}  # 96 GiB of host memory holds every streamed layer
    assert p.layer_bytes[0] == pytest.approx(0.445e9, rel=0.005)  # 856M params at ~4.16 bits
    assert p.fixed_bytes == pytest.approx(128_256 * 8192 * 2, rel=0.001)  # the embedding table in fp16
    assert p.resident_bytes <= 20 * 2**30 < p.resident_bytes + p.layer_bytes[0]
    assert plan.per_token_bytes == (2 * 8192 + 3 * 28672) * 2 == 200 * 1024
    assert plan.tokens_per_batch == entry["tokens_per_batch"] == 7168
    assert plan.passes == 57 and p.streamed_bytes == pytest.approx(16.46e9, rel=0.001)


def test_iisan_plan_prints_the_plan_offline(tmp_path):
    # from another folder and with no --model-config: the config shipped in the package, as the log says
    r = iisan("plan", "llama3-70b-gptq", "--config", REPO / "config.yaml", "--device-memory", "24GB", cwd=tmp_path,
              env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "43 / 37 (37 from host memory, 0 from disk)" in r.stdout
    assert "tokens_per_batch                 7168" in r.stdout and "predicted time" in r.stdout
    assert f"planning from the config shipped with iisan, {MODEL_CONFIGS / 'llama3-70b-gptq'}" in r.stderr
    r = iisan("plan", "no-such-backbone", "--config", REPO / "config.yaml", cwd=REPO)
    assert r.returncode == 2 and "backbone 'no-such-backbone' is not in" in r.stderr
    # neither on the machine nor shipped: the named error with the download to make
    with pytest.raises(ModelLoadError, match=r"(?s)'nobody/none' is not available locally.*hf download nobody/none"):
        plan_backbone(BackboneSpec(model="nobody/none"), name="nobody")
