"""Bounded memory end to end: caches read in place (every residency trains to the same bytes,
reading only the rows a step needs), ranks counted in blocks equal to a full score matrix,
image fingerprints from file bytes (nothing decoded), decoding in worker processes, pixels
read per batch."""

from pathlib import Path

import numpy as np
import pytest
import torch

from iisan.data.prepared import PreparedData
from iisan.extract import cache

from conftest import QUICK, fit, read_json


def test_every_residency_trains_to_the_same_bytes_reading_only_the_rows_it_needs(small_demo, caches, tmp_path,
                                                                                  monkeypatch, caplog):  # fmt: skip
    from iisan.train import features, model

    _, data_dir = small_demo
    reads, needed = [], []
    read = cache.CacheReader._read

    def counting(self, item):
        reads.append(item)
        return read(self, item)

    slots = model.Recommender.embed_slots

    def noting(self, seqs):
        needed.append(len(torch.unique(seqs)))  # the distinct items (padding included) a step encodes
        return slots(self, seqs)

    caplog.set_level("INFO", logger="iisan.train.features")
    runs = {r: fit(data_dir, tmp_path / r, caches, **dict(QUICK, epochs=2), residency=r) for r in ("device", "host")}
    assert "reside on the" not in caplog.text  # only auto chooses, and says so
    monkeypatch.setattr(features, "LRU_BYTES", 0)  # every read reaches the store
    monkeypatch.setattr(cache.CacheReader, "_read", counting)
    monkeypatch.setattr(model.Recommender, "embed_slots", noting)
    runs["disk"] = fit(data_dir, tmp_path / "disk", caches, **dict(QUICK, epochs=1), residency="disk")
    # two caches: each step reads its distinct items once, and each of the 2 item passes every item once (the
    # epoch's validation; then one pass with the best weights for the valid and test ranks and the top-K lists)
    assert needed and len(reads) == 2 * sum(needed) + 2 * 2 * (PreparedData.load(data_dir).n_items + 1)
    monkeypatch.undo()
    runs["disk"] = fit(data_dir, tmp_path / "disk2", caches, **dict(QUICK, epochs=2), residency="disk")
    for r in ("host", "disk"):
        assert runs[r]["test"] == runs["device"]["test"] and runs[r]["valid"] == runs["device"]["valid"], r
        assert [h["loss"] for h in runs[r]["history"]] == [h["loss"] for h in runs["device"]["history"]], r
    a = torch.load(tmp_path / "device/model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "disk2/model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "device/ranks.npz").read_bytes() == (tmp_path / "disk2/ranks.npz").read_bytes()
    fit(data_dir, tmp_path / "auto", caches, **dict(QUICK, epochs=1))
    assert "caches (" in caplog.text and "reside on the device" in caplog.text  # small: on the device, logged


def _full_matrix_ranks(users, items, target, history):
    """Ranks as they were computed before blocks: one (U, N+1) score matrix."""
    n1 = items.shape[0]
    scores = users @ items.T
    scores[:, 0] = float("-inf")
    in_hist = (history == target[:, None]).any(1)
    scores.scatter_(1, history, float("-inf"))
    t = scores.gather(1, target[:, None])
    above = (scores >= t).sum(1) - 1
    return torch.where(in_hist, torch.full_like(above, n1), above)


def test_blocked_ranks_equal_a_full_score_matrix_on_the_demo(small_demo, caches, tmp_path):
    from iisan.train.loop import rank_all
    from iisan.train.metrics import rank_of_target
    from iisan.train.model import item_embeddings, user_embeddings
    from iisan.use.trained import load_run

    _, data_dir = small_demo
    fit(data_dir, tmp_path / "run", caches, **QUICK)
    model, data, _ = load_run(tmp_path / "run")
    sp = {k: torch.as_tensor(v) for k, v in data.splits.items()}
    items = item_embeddings(model, 2048, float32=False)
    users = user_embeddings(model, sp["test_input"], 2048, float32=False)
    want = _full_matrix_ranks(users, items, sp["test_target"], sp["test_history"])
    assert torch.equal(rank_all(model, sp["test_input"], sp["test_target"], sp["test_history"], 2048), want)
    assert torch.equal(torch.as_tensor(np.load(tmp_path / "run/ranks.npz")["test"]), want.int())
    several = rank_of_target(users, items, sp["test_target"], sp["test_history"], item_block=64)  # 5 blocks
    assert torch.equal(several, want)
    assert read_json(tmp_path / "run/metrics.json")["history"][0]["eval_seconds"] > 0


def test_image_fingerprints_read_the_bytes_and_decode_nothing(tmp_path, monkeypatch):
    from PIL import ImageFile

    from iisan.data.prepare import prepare
    from iisan.data.synth import synthesize

    raw = synthesize(tmp_path / "raw", n_items=40, n_users=80, seed=5)
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or load(self))
    a = prepare(raw["items"], raw["users"], tmp_path / "a", images=raw["images"])
    assert decoded == []  # read and fingerprinted, never decoded
    img = sorted(Path(raw["images"]).iterdir())[0]
    data = bytearray(img.read_bytes())
    data[-3] ^= 0x01  # one byte of one file
    img.write_bytes(data)
    b = prepare(raw["items"], raw["users"], tmp_path / "b", images=raw["images"])
    assert a["image_fingerprint"] != b["image_fingerprint"]


def test_images_decode_in_worker_processes_as_inline(tiny, small_demo):
    from iisan.extract.backbones import Backbone
    from iisan.extract.item_inputs import ItemInputs
    from iisan.extract.specs import BackboneSpec

    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    b = Backbone(BackboneSpec(model=str(tiny["tiny-vit"]), modality="image"))
    ids = list(range(1, 101))
    pool = ItemInputs(data, b, workers=2)
    try:
        parallel = pool.raw(ids)
        assert pool._pool is not None  # it really used worker processes
    finally:
        pool.close()
    inline = ItemInputs(data, b, workers=0).raw(ids)
    assert [im.tobytes() for im in parallel] == [im.tobytes() for im in inline]


@pytest.mark.parametrize("kind", ["tiny-vit", "tiny-bert"])
def test_backbones_in_the_loop_hold_no_catalogue_of_pixels(tiny, small_demo, kind):
    from iisan.extract.backbones import Backbone
    from iisan.extract.item_inputs import EncodedItems
    from iisan.extract.specs import BackboneSpec

    _, data_dir = small_demo
    data = PreparedData.load(data_dir)
    b = Backbone(BackboneSpec(model=str(tiny[kind]), modality="image" if kind == "tiny-vit" else "text"))
    enc = EncodedItems(data, b)
    held = sum(t.nbytes for t in (enc.tensors or {}).values())
    if kind == "tiny-vit":
        assert held == 0 and enc([3, 5])["pixel_values"].shape == (2, 3, 32, 32)  # read per batch
    else:  # titles: token ids of every item, small
        assert 0 < held <= (data.n_items + 1) * b.spec.max_text_len * 8 * 3


def test_loading_a_cache_into_memory_holds_it_once(tmp_path):
    # host residency: the array itself plus at most a chunk's worth, not a whole-cache mask beside it
    import tracemalloc

    n, k, h, chunk = 8191, 7, 64, 512
    attrs = {"model": "generated", "revision": None, "weights": None, "modality": "text", "n_layers": 12,
             "layers": list(range(0, 13, 2)), "pooling": "mean", "hidden": h, "quantization": None,
             "dtype": "float16", "max_text_len": 30, "image_size": None, "field": "title", "input_fingerprint": "x",
             "data_fingerprint": "x", "n_items": n, "chunk_items": chunk, "code": "test"}  # fmt: skip
    writer = cache.CacheWriter(tmp_path / "c.zarr", attrs, on_mismatch="rebuild")
    rng = np.random.default_rng(0)
    for c in range(writer.n_chunks):
        lo, hi = writer.chunk_rows(c)
        writer.write_chunk(c, rng.standard_normal((hi - lo, k, h), dtype=np.float32).astype("float16"))
    reader = cache.CacheReader(tmp_path / "c.zarr")
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    rows = reader.read_all()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows.shape == (n + 1, k, h) and np.isfinite(rows).all()
    assert rows.nbytes <= peak < rows.nbytes + 4 * chunk * k * h * 2  # (a whole-array mask: + nbytes / 2)
