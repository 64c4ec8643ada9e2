"""Uncached IISAN and the embedded baselines: they freeze what they claim, LoRA
starts from the pretrained model, uncached == cached; and TPME by hand."""

import pytest
import torch

from iisan.data.prepared import PreparedData
from iisan.extract.backbones import Backbone
from iisan.extract.item_inputs import EncodedItems
from iisan.extract.specs import BackboneSpec
from iisan.results.efficiency import tpme
from iisan.train import methods
from iisan.train.features import CachedFeatures
from iisan.train.live import LiveFeatures
from iisan.train.model import ItemSources
from iisan.train.san import SANItemEncoder
from iisan.train.settings import ModelConfig, PEFTConfig

from conftest import fit


def _backbones(tiny):
    return {
        "text": Backbone(BackboneSpec(model=str(tiny["tiny-bert"]))),
        "image": Backbone(BackboneSpec(model=str(tiny["tiny-vit"]), modality="image")),
    }


def _step(enc: torch.nn.Module, ids):
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    enc(ids).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("method", ["fft", "lora", "adapter", "bitfit"])
def test_embedded_methods_train_exactly_what_they_claim(tiny, small_demo, method):
    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    bbs = _backbones(tiny)
    before = {m: {n: p.detach().clone() for n, p in b.model.named_parameters()} for m, b in bbs.items()}
    enc = methods.load(methods.get(method).item_encoder)(
        ModelConfig(method=method, d=16), ItemSources(data, backbones=bbs)
    )
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    head = {"head.weight", "head.bias"}
    if method == "fft":
        assert trainable == {n for n, _ in enc.named_parameters()}
    elif method == "bitfit":
        assert trainable - head and all(n.endswith("bias") for n in trainable - head)
    elif method == "lora":
        lora = trainable - head
        assert lora and all("lora_" in n for n in lora)
        assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora} == {"query", "value", "q_proj", "v_proj"}
        assert n_trainable == 16 * (64 + 64 + 1) + 2 * 12 * 2 * (2 * 64 * 8)  # head + r=8 A,B on q,v of 12+12 layers
    elif method == "adapter":
        ad = trainable - head
        assert ad and all(".adapter." in n for n in ad)
        assert len({n.rsplit(".adapter.", 1)[0] for n in ad}) == 2 * 12 * 2  # two per layer, both towers
    _step(enc, torch.arange(1, 40))
    for m, b in bbs.items():
        changed, frozen_changed = [], []
        for key, new in b.model.named_parameters():
            name = _original_name(key)
            if name not in before[m]:
                continue  # a parameter the method added
            if not torch.equal(new, before[m][name]):
                (changed if new.requires_grad else frozen_changed).append(name)
        assert not frozen_changed, f"{method}: frozen {m} weights changed: {frozen_changed[:3]}"
        if method == "fft":
            assert changed
        elif method == "bitfit":
            assert changed and all(n.endswith("bias") for n in changed)
        else:
            assert not changed  # LoRA and adapters leave every pretrained weight bit-identical


def _original_name(key: str) -> str:
    """Parameter name before PEFT wrapped its module (LoRA: .base_layer, adapters: .proj)."""
    return key.replace(".base_layer", "").replace(".proj.", ".")


def test_lora_and_adapters_start_from_the_pretrained_outputs(tiny, small_demo):
    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    for method in ("lora", "adapter"):
        ref = _backbones(tiny)
        peft = _backbones(tiny)
        adapt = methods.load(methods.get(method).item_encoder).adapt
        for m in ("text", "image"):
            x = EncodedItems(data, ref[m])(list(range(1, 20)))
            want = ref[m].forward(x, [0, 6, 12])
            peft[m].model = adapt(peft[m].model, PEFTConfig()).eval()
            assert torch.equal(peft[m].forward(x, [0, 6, 12]), want), (method, m)


def test_uncached_and_cached_iisan_give_the_same_item_embeddings(tiny, small_demo, caches):
    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    cached = CachedFeatures(data, caches)
    live = LiveFeatures(
        data, _backbones(tiny), {"text": cached.attrs["text"]["layers"], "image": cached.attrs["image"]["layers"]}
    )
    assert cached.shape("text") == live.shape("text") and cached.shape("image") == live.shape("image")
    torch.manual_seed(0)
    enc = SANItemEncoder(ModelConfig(), ItemSources(data, features=cached)).eval()
    ids = torch.arange(0, data.n_items + 1)
    with torch.no_grad():
        a, b = enc.encode(*cached(ids)), enc.encode(*live(ids))
    # the same fp16-rounded hidden states; batch padding can move a value by one fp16 ulp at most
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-3)
    ht_c, ht_l = cached(ids)[0], live(ids)[0]
    assert (ht_c == ht_l).float().mean() > 0.99


def test_uncached_training_reaches_the_cached_metrics(tiny, small_demo, caches, tmp_path):
    import json

    _, data_dir = small_demo
    specs = {
        "text": BackboneSpec(model=str(tiny["tiny-bert"])),
        "image": BackboneSpec(model=str(tiny["tiny-vit"]), modality="image"),
    }
    cfg = dict(epochs=4, patience=4, batch_size=64, lr=2e-3, lr_san=2e-3)
    u = fit(data_dir, tmp_path / "u", backbones=specs, method="uncached", **cfg)
    c = fit(data_dir, tmp_path / "c", caches, method="iisan", **cfg)
    for split in ("valid", "test"):
        assert abs(u[split]["HR@10"] - c[split]["HR@10"]) <= 0.01, (u[split], c[split])
    eff = json.loads((tmp_path / "u/efficiency.json").read_text())
    assert eff["total_parameters"] > 10 * eff["trainable_parameters"] and u["caches"]["text"]["mode"] == "uncached"


def test_tpme_min_max_normalised_by_hand():
    rows = {
        "fft": {"seconds_per_epoch": 100, "trainable_parameters": 1000, "peak_memory_bytes": 50},
        "iisan": {"seconds_per_epoch": 10, "trainable_parameters": 10, "peak_memory_bytes": 5},
        "lora": {"seconds_per_epoch": 80, "trainable_parameters": 10, "peak_memory_bytes": 40},
    }
    s = tpme(rows)
    assert s["fft"] == pytest.approx(1.0) and s["iisan"] == pytest.approx(0.0)
    assert s["lora"] == pytest.approx(0.45 * 70 / 90 + 0.1 * 0 + 0.45 * 35 / 45)
    assert tpme({"a": rows["fft"], "b": rows["fft"]}) == {"a": 0.0, "b": 0.0}


@pytest.mark.parametrize("method", ["fft", "lora", "iisan"])
def test_evaluation_builds_no_autograd_graph(tiny, small_demo, caches, method):
    """Ranking every item keeps no tensor for a backward pass, for embedded baselines (whose
    backbones train) as for cached IISAN: counted by autograd's own saved-tensor hooks."""
    from iisan.train.loop import rank_all
    from iisan.train.model import Inputs, build

    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    if method == "iisan":
        inputs = Inputs.of(caches=caches)
    else:
        specs = {"text": BackboneSpec(model=str(tiny["tiny-bert"])),
                 "image": BackboneSpec(model=str(tiny["tiny-vit"]), modality="image")}  # fmt: skip
        inputs = Inputs.of(backbones=specs)
    model = build(ModelConfig(method=method, d=16), data, inputs, torch.device("cpu"))
    sp = {k: torch.as_tensor(v[:64]) for k, v in data.splits.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        ranks = rank_all(model, sp["valid_input"], sp["valid_target"], sp["valid_history"], 128)
    assert saved == [] and not ranks.requires_grad and len(ranks) == 64
    model.train()  # and training still builds one, through the backbones for the embedded methods
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        model.embed_items(torch.arange(1, 9)).sum().backward()
    assert saved
