"""Stage one: backbones, pooling, the resumable cache."""

import json
import signal
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from iisan.core.device import resolve_device
from iisan.core.errors import CacheMismatchError, DataError, ExtractionError, ModelLoadError
from iisan.core.measure import PeakMemory
from iisan.data.prepared import PreparedData
from iisan.extract import cache
from iisan.extract.backbones import Backbone
from iisan.extract.batching import BatchSizer
from iisan.extract.extraction import extract, finish
from iisan.extract.specs import BackboneSpec

from conftest import iisan, iisan_started


def load_cache(store):
    """A cache's rows as a torch tensor, and its attributes."""
    rows, attrs = cache.load(store)
    return torch.from_numpy(rows), attrs


def _spec(tiny, kind, **kw):
    return BackboneSpec(model=str(tiny[kind]), modality="image" if kind == "tiny-vit" else "text", **kw)


def test_tiny_backbones_load_through_auto_classes(tiny):
    info = {k: Backbone(_spec(tiny, k)).info for k in tiny}
    assert info["tiny-bert"]["n_layers"] == 12 and info["tiny-bert"]["pooling"] == "cls"
    assert info["tiny-vit"]["n_layers"] == 12 and info["tiny-vit"]["pooling"] == "cls"
    assert info["tiny-llama"]["n_layers"] == 24 and info["tiny-llama"]["pooling"] == "mean"
    assert info["tiny-llama-gptq"]["quantization"] == "gptq"
    assert info["tiny-llama"]["hidden"] != info["tiny-vit"]["hidden"]  # VA needs the DTL


def test_mean_pooling_ignores_padding_and_cls_takes_token_zero(tiny):
    b = Backbone(_spec(tiny, "tiny-llama"))
    titles = ["a short title", "a much longer title with many more words in it than the first"]
    batched = b.forward(b.encode_inputs(titles), [0, 12, 24])
    alone = b.forward(b.encode_inputs(titles[:1]), [0, 12, 24])
    assert torch.allclose(batched[0], alone[0], atol=1e-4)  # padding does not leak into the mean
    x = b.encode_inputs(titles[:1])
    hs = b.model(**x, output_hidden_states=True).hidden_states
    assert torch.allclose(alone[0, 2], hs[24][0].mean(0), atol=1e-5)
    bert = Backbone(_spec(tiny, "tiny-bert"))
    x = bert.encode_inputs(titles)
    hs = bert.model(**x, output_hidden_states=True).hidden_states
    assert torch.allclose(bert.forward(x, [0, 6])[:, 1], hs[6][:, 0])


TITLES = ["a", "steel beaker 250 ml", "a glass pipette with a long name and many words to pad the batch out", "red"]


@pytest.mark.parametrize("offload", [False, True])
def test_hook_pooling_is_bit_identical_to_all_hidden_states(tiny, tmp_path, offload):
    """Taps pooled by forward hooks equal transformers' hidden_states pooled afterwards,
    bit for bit: CLS (BERT, ViT: no final-norm tie) and masked mean (Llama, GPTQ: the
    last tap is after the final norm), any layer subset, and with weights on disk."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    kinds = ["tiny-llama", "tiny-llama-gptq"] if offload else list(tiny)
    for kind in kinds:
        budget = {"tiny-llama": "20MB", "tiny-llama-gptq": "8.5MB"}.get(kind)  # the embeddings and 7 layers
        kw = dict(device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / kind))
        b = Backbone(_spec(tiny, kind, **(kw if offload else {})))
        assert not offload or "disk" in set(b.stream.homes.values())
        x = b.encode_inputs(images if kind == "tiny-vit" else TITLES)
        n = b.info["n_layers"]
        for layers in (list(range(n + 1)), [0, n // 2, n], [n], [1]):
            hooked = b.forward(x, layers)
            assert hooked.shape == (len(x[next(iter(x))]), len(layers), b.info["hidden"])
            assert torch.equal(hooked, b.forward_hidden_states(x, layers)), (kind, layers)
        assert torch.equal(b.forward(x, [n], trainable=True).detach(), b.forward_hidden_states(x, [n]))  # embedded


def test_batch_plan_sorts_by_length_under_item_and_token_caps():
    from iisan.extract.batching import padded_tokens, plan

    lengths = [5, 1, 3, 3, 2]
    assert plan(lengths, max_items=2) == [[1, 4], [2, 3], [0]]  # stable: equal lengths keep item order
    assert plan(lengths, max_items=9, max_tokens=6) == [[1, 4], [2, 3], [0]]  # 3 items x 3 tokens > 6
    assert plan(lengths, max_items=9, max_tokens=5) == [[1, 4], [2], [3], [0]]
    assert plan([7], max_items=4, max_tokens=3) == [[0]]  # longer than the budget: alone
    assert padded_tokens(lengths, [[1, 4], [2, 3], [0]]) == (14, 2 * 2 + 2 * 3 + 5)


def test_missing_model_is_a_clear_error():
    with pytest.raises(ModelLoadError, match=r"not available locally.*\n  fix: .*hf download"):
        Backbone(BackboneSpec(model="no-such-org/no-such-model"))


def test_extraction_writes_selected_layers_fp16_row0_zero(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    store = tmp_path / "bert.zarr"
    stats = extract(data_dir, _spec(tiny, "tiny-bert"), {"n": 6}, store, chunk_items=64)
    arr, attrs = load_cache(store)
    assert arr.shape == (data.n_items + 1, 7, 64) and arr.dtype == torch.float16
    assert attrs["layers"] == [0, 2, 4, 6, 8, 10, 12] and attrs["pooling"] == "cls"
    assert arr[0].abs().sum() == 0 and stats["chunks_done_now"] == stats["chunks_total"] == 5
    b = Backbone(_spec(tiny, "tiny-bert"))
    direct = b.forward(b.encode_inputs([data.titles[5]]), attrs["layers"])[0]
    assert torch.allclose(arr[5].float(), direct, atol=2e-3, rtol=2e-3)
    vit = tmp_path / "vit.zarr"
    extract(data_dir, _spec(tiny, "tiny-vit"), {"n": 6}, vit, chunk_items=64)
    assert load_cache(vit)[1]["image_size"] == 32


def test_gptq_streamed_from_disk_matches_a_resident_load(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    plain, offl = tmp_path / "cpu.zarr", tmp_path / "offload.zarr"
    extract(data_dir, _spec(tiny, "tiny-llama-gptq", backend="torch"), {"n": 6}, plain, chunk_items=128)
    spec = _spec(tiny, "tiny-llama-gptq", device_map="auto", max_memory={"cpu": "8.5MB"},
                 offload_folder=str(tmp_path / "off"))  # fmt: skip
    stats = extract(data_dir, spec, {"n": 6}, offl, chunk_items=128)
    a, attrs = load_cache(plain)
    o, _ = load_cache(offl)
    assert attrs["layers"] == [0, 4, 8, 12, 16, 20, 24] and attrs["quantization"] == "gptq"
    assert torch.equal(a, o)
    assert stats["layers_resident"] == 7 and stats["layers_streamed"] == 17
    # every streamed layer's 4-bit weights crossed once per chunk, whatever the number of passes
    layer = stats["streamed_weight_bytes_per_chunk"] / 17
    assert stats["streamed_weight_bytes"] == 17 * layer * stats["chunks_done_now"] and stats["passes"] > 3
    assert 80_000 < layer < 100_000  # 7 packed 4-bit linears (qweight, qzeros, scales, g_idx) and 2 fp16 norms
    assert stats["streamed_weight_bytes_per_item"] == pytest.approx(stats["streamed_weight_bytes"] / stats["items"])


def test_length_sorted_batches_scatter_back_to_item_order(tiny, small_demo, tmp_path):
    """Batches sorted by length land in the right rows: equal to one item per pass up to
    float32 rounding (a batch's shape changes the matmul blocking, never more), the same
    bytes on a rerun, and with less padding than batches in item order."""
    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    runs = {}
    for name, kw in {"one": dict(batch_size=1), "sorted": dict(batch_size=64), "again": dict(batch_size=64),
                     "budget": dict(batch_size=512, tokens_per_batch=300)}.items():  # fmt: skip
        stats = extract(data_dir, _spec(tiny, "tiny-llama", **kw), {"n": 6}, tmp_path / f"{name}.zarr", chunk_items=128)
        runs[name] = (load_cache(tmp_path / f"{name}.zarr")[0].float(), stats)
    one = runs["one"][0]
    scale = one.abs().amax(dim=(0, 2), keepdim=True)  # per layer
    for name in ("sorted", "budget"):
        assert ((runs[name][0] - one).abs() / scale).max() < 2e-3, name
    assert torch.equal(runs["sorted"][0], runs["again"][0])
    s = runs["sorted"][1]
    assert runs["one"][1]["padding_share"] == 0 and runs["one"][1]["passes"] == data.n_items
    tok = Backbone(_spec(tiny, "tiny-llama")).processor
    lengths = [len(tok(t, truncation=True, max_length=30)["input_ids"]) for t in data.titles[1:]]
    chunks = [lengths[max(lo, 1) - 1 : lo + 127] for lo in range(0, len(lengths) + 1, 128)]  # item ids lo..lo+127
    in_order = [c[i : i + 64] for c in chunks for i in range(0, len(c), 64)]
    unsorted_share = 1 - sum(lengths) / sum(len(b) * max(b) for b in in_order)
    assert 0 < s["padding_share"] < unsorted_share
    assert s["batch_size"] == 64 and s["tokens_per_batch"] is None
    assert s["mean_batch_items"] == data.n_items / s["passes"]
    b = runs["budget"][1]
    assert b["tokens_per_batch"] == 300 and b["padding_share"] < s["padding_share"]
    for key in ("items_per_s", "forward_share", "peak_memory_bytes", "peak_memory_above_baseline_bytes"):
        assert s[key] > 0, key
    assert s["peak_memory_kind"] == PeakMemory(resolve_device("auto")).kind and s["streamed_weight_bytes_per_item"] == 0
    # the token counts behind the padding share: the real ones are the titles' own lengths
    assert s["real_tokens"] == sum(lengths) and s["padding_share"] == 1 - s["real_tokens"] / s["padded_tokens"]


@pytest.mark.parametrize(
    "oom",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"),
        lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
)
def test_batch_size_auto_halves_on_out_of_memory_and_keeps_it(tiny, small_demo, tmp_path, monkeypatch, caplog, oom):
    _, data_dir = small_demo
    forward, sizes, held, freed = Backbone.forward, [], [], []
    shrink = BatchSizer.shrink

    def small_memory(self, inputs, layers, trainable=False):
        n = len(inputs["input_ids"])
        sizes.append(n)
        if n > 40:
            activations = torch.zeros(n, 1000)  # what the failed pass had allocated
            held.append(weakref.ref(activations))
            raise oom()  # a new one each time, as the allocator raises them
        return forward(self, inputs, layers, trainable)

    def shrink_noting_what_is_freed(self, failed_items):
        freed.append(held[-1]() is None)  # the failed pass's memory is released before the retry
        return shrink(self, failed_items)

    monkeypatch.setattr(BatchSizer, "shrink", shrink_noting_what_is_freed)
    monkeypatch.setattr(Backbone, "forward", small_memory)
    caplog.set_level("INFO", logger="iisan.extract.batching")
    stats = extract(data_dir, _spec(tiny, "tiny-bert", batch_size="auto"), {}, tmp_path / "auto.zarr", chunk_items=128)
    # chunk 0 holds items 1..127; halved twice, then kept for every later chunk
    assert sizes[:3] == [127, 63, 31] and max(sizes[3:]) <= 31
    assert stats["batch_size"] == 31 and stats["tokens_per_batch"] == 8192 // 4
    assert "out of memory at 63 items per pass: batch_size auto now uses 31" in caplog.text
    assert freed == [True, True]
    monkeypatch.setattr(Backbone, "forward", forward)
    fixed = tmp_path / "fixed.zarr"
    extract(data_dir, _spec(tiny, "tiny-bert", batch_size=31), {}, fixed, chunk_items=128)
    assert torch.equal(load_cache(tmp_path / "auto.zarr")[0], load_cache(fixed)[0])  # same passes, same bytes
    monkeypatch.setattr(Backbone, "forward", small_memory)
    msg = r"out of accelerator memory on a forward pass of 64 item\(s\)\n  fix: .*batch_size: auto"
    with pytest.raises(ExtractionError, match=msg):
        extract(data_dir, _spec(tiny, "tiny-bert", batch_size=64), {}, tmp_path / "f.zarr", chunk_items=128)


def test_killed_extraction_resumes_only_missing_chunks(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    store = tmp_path / "llama.zarr"
    backbone = json.dumps({"model": str(tiny["tiny-llama"]), "modality": "text", "batch_size": 1})
    args = [
        "extract",
        "--data",
        str(data_dir),
        "--backbone",
        backbone,
        "--layers",
        '{"n": 6}',
        "--store",
        str(store),
        "--chunk-items",
        "8",
        "--done",
        str(tmp_path / "llama.done"),
    ]
    p = iisan_started(*args)
    progress = cache.progress_dir(store)
    deadline = time.time() + 120
    while time.time() < deadline and (not progress.is_dir() or len(list(progress.iterdir())) < 3):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)  # a real kill, mid-run
    p.wait()
    p.stdout.close()
    done_before = len(list(progress.iterdir()))
    total = len(cache.missing_chunks(store)) + done_before
    assert 3 <= done_before < total, "extraction finished before it could be killed"
    assert not (tmp_path / "llama.done").exists()
    with pytest.raises(DataError, match="chunk\\(s\\) not extracted yet"):
        load_cache(store)
    out, _ = iisan_started(*args).communicate()
    stats = json.loads((tmp_path / "llama.done").read_text())["stats"]
    assert stats["chunks_done_now"] == total - done_before, out
    resumed, _ = load_cache(store)
    fresh = tmp_path / "fresh.zarr"
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-llama"]), batch_size=1), {"n": 6}, fresh, chunk_items=8)
    assert torch.equal(resumed, load_cache(fresh)[0])


def test_stale_store_is_refused_or_rebuilt_never_mixed(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    store = tmp_path / "bert.zarr"
    extract(data_dir, _spec(tiny, "tiny-bert"), {"n": 6}, store, chunk_items=64)
    with pytest.raises(CacheMismatchError, match=r"layers: cached \[0, 2, 4, 6, 8, 10, 12\], asked \[0, 2, 7, 12\]"):
        extract(data_dir, _spec(tiny, "tiny-bert"), {"n": 3}, store, chunk_items=64)
    with pytest.raises(CacheMismatchError, match="model: cached"):
        extract(data_dir, _spec(tiny, "tiny-llama"), {"n": 6}, store, chunk_items=64)
    stats = extract(data_dir, _spec(tiny, "tiny-bert"), {"n": 3}, store, chunk_items=64, on_mismatch="rebuild")
    assert stats["chunks_done_now"] == stats["chunks_total"]
    arr, attrs = load_cache(store)
    assert attrs["layers"] == [0, 2, 7, 12] and arr.shape[1] == 4
    # a reader refuses a cache made from other item inputs
    with pytest.raises(CacheMismatchError, match="input_fingerprint"):
        cache.load(store, expect={"input_fingerprint": "something else"})


def test_shards_write_disjoint_chunks_then_verify(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    store = tmp_path / "s.zarr"
    spec = _spec(tiny, "tiny-bert")
    extract(data_dir, spec, {"n": 6}, store, chunk_items=32, init_only=True)
    s0 = extract(data_dir, spec, {"n": 6}, store, chunk_items=32, shard=0, nshards=3)
    with pytest.raises(DataError, match="not extracted yet"):
        finish(store, tmp_path / "s.done")
    s1 = extract(data_dir, spec, {"n": 6}, store, chunk_items=32, shard=1, nshards=3)
    s2 = extract(data_dir, spec, {"n": 6}, store, chunk_items=32, shard=2, nshards=3)
    assert s0["chunks_done_now"] + s1["chunks_done_now"] + s2["chunks_done_now"] == s0["chunks_total"] == 10
    finish(store, tmp_path / "s.done")
    whole = tmp_path / "w.zarr"
    extract(data_dir, spec, {"n": 6}, whole, chunk_items=32)
    assert torch.equal(load_cache(store)[0], load_cache(whole)[0])


def test_cache_info_reports_bytes_and_full_layer_cost(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    store = tmp_path / "l.zarr"
    extract(data_dir, _spec(tiny, "tiny-llama"), {"n": 6}, store, chunk_items=128)
    info = cache.info(store)
    n = PreparedData.load(data_dir).n_items + 1
    assert info["bytes_selected"] == n * 7 * 128 * 2 and info["bytes_all_layers"] == n * 25 * 128 * 2
    assert info["bytes_on_disk"] >= info["bytes_selected"]  # uncompressed
    r = iisan("cache-info", store)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"({n}, 7, 128) float16" in out and "all 25 layers would take" in out and "3.6x the selected layers" in out


def test_image_backbone_on_text_only_data_is_refused(tiny, tmp_path):
    from iisan.data.prepare import prepare

    from conftest import write

    items = write(tmp_path / "i.tsv", "".join(f"A{i}\tt{i}\n" for i in range(6)))
    users = write(tmp_path / "u.tsv", "u\t" + " ".join(f"A{i}" for i in range(6)) + "\n")
    prepare(items, users, tmp_path / "d")
    with pytest.raises(DataError, match="dataset has no images but the backbone is an image encoder"):
        extract(tmp_path / "d", _spec(tiny, "tiny-vit"), {"n": 6}, tmp_path / "v.zarr")
