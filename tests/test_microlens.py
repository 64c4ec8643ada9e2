"""MicroLens in its published layout, captions from a frozen vision-language model, and
caches of caption text (the multimodal-text scenario)."""

import json
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from iisan.core.errors import DataError
from iisan.data.microlens import synthesize_microlens
from iisan.data.prepare import prepare
from iisan.data.prepared import PreparedData
from iisan.extract import cache
from iisan.extract.caption import Captioner, caption
from iisan.extract.caption_table import read_captions
from iisan.extract.extraction import extract
from iisan.extract.specs import CaptionSpec
from iisan.train.features import CachedFeatures

from conftest import iisan, iisan_started


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    """A generated MicroLens-layout download and its prepared dataset."""
    root = tmp_path_factory.mktemp("microlens")
    raw = synthesize_microlens(root / "raw", n_items=120, n_users=400, seed=0)
    prepare(raw["items"], raw["users"], root / "data", images=raw["images"], format="microlens")
    return raw, root / "data"


@pytest.fixture(scope="module")
def llava(tiny):
    from iisan.extract.tiny import build_tiny

    return build_tiny("tiny-llava", tiny["tiny-bert"].parent / "tiny-llava")


def _spec(llava, **kw):
    return CaptionSpec(model=str(llava), **{"max_new_tokens": 6, "batch_size": 16, "chunk_items": 40, **kw})


def test_reader_applies_the_amazon_preparation_rules(ml, tmp_path):
    raw, data_dir = ml
    data = PreparedData.load(data_dir)
    seqs = [line.split("\t")[1].split() for line in Path(raw["users"]).read_text().splitlines()]
    kept = [s[-13:] for s in seqs if len(s) >= 5]  # >= 5 items, the last 13 kept
    assert data.meta["n_users"] == len(kept) and data.meta["n_interactions"] == sum(map(len, kept))
    assert data.asins[1:] == [str(i) for i in range(1, 121)]  # item ids 1..N as published
    titles = dict(line.split(",", 1) for line in Path(raw["items"]).read_text().splitlines())
    assert data.titles[7] == titles["7"].replace("&amp;", "&") and "," in data.titles[7]  # first comma only
    assert data.titles[25] == ""  # empty titles are kept (and counted in the log)
    from_csv = prepare(raw["items"], raw["pairs_csv"], tmp_path / "csv", images=raw["images"], format="microlens")
    assert from_csv["sequences_fingerprint"] == data.meta["sequences_fingerprint"]  # CSV sorted by timestamp
    assert data.meta["image_source_kind"] == "zip" and data.image_keys[3].endswith("/3.jpg")


def test_microlens_is_prepared_as_published_every_interaction_kept(tmp_path):
    # the published structure in small: every user >= 5 items, a long tail of heavy users (MicroLens-100K:
    # 100,000 users, 19,738 items, 719,405 interactions), some items seen only early in a long history
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 9, 180), rng.integers(14, 60, 20)])
    n_items = 150
    seqs = [[int(x) for x in rng.integers(1, 121, n)] for n in lengths]
    for i, s in enumerate(seqs[180:]):  # items 121..140 only ever at the start of a heavy user's history
        s[0] = 121 + i
    (tmp_path / "titles.csv").write_text("".join(f"{i},title {i}\n" for i in range(1, n_items + 1)))
    (tmp_path / "pairs.tsv").write_text("".join(f"{u}\t{' '.join(map(str, s))}\n" for u, s in enumerate(seqs, 1)))
    full = prepare(tmp_path / "titles.csv", tmp_path / "pairs.tsv", tmp_path / "full", format="microlens",
                   truncate=False)  # fmt: skip
    cut = prepare(tmp_path / "titles.csv", tmp_path / "pairs.tsv", tmp_path / "cut", format="microlens")
    used = {x for s in seqs for x in s}
    assert (full["n_users"], full["n_items"], full["n_interactions"]) == (200, len(used), int(lengths.sum()))
    assert full["truncate"] is False and cut["truncate"] is True
    assert cut["n_interactions"] == sum(min(n, 13) for n in lengths) and cut["n_items"] < full["n_items"]
    data = PreparedData.load(tmp_path / "full")
    early = data.asins.index("121")
    assert data.popularity[early] > 0  # counted in the loss's popularity, though outside every input window
    heavy = 180  # the first heavy user: targets are the last two items, inputs the 10 before, as for Amazon
    ids = [data.asins.index(str(x)) for x in seqs[heavy]]
    assert data.splits["test_target"][heavy] == ids[-1] and data.splits["valid_target"][heavy] == ids[-2]
    assert data.splits["test_input"][heavy].tolist() == ids[-11:-1]


def test_bad_microlens_input_is_named(ml, tmp_path, caplog):
    raw, _ = ml
    titles = tmp_path / "titles.csv"
    titles.write_text("1,a title, with a comma\n2 no comma here\n")
    with pytest.raises(DataError, match=r"titles.csv, line 2: expected `item_id,title`"):
        prepare(titles, raw["users"], tmp_path / "a", format="microlens")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("u1\t1 2 3 4 999\n")
    with pytest.raises(DataError, match=r"pairs.tsv, line 1: .*'999'"):
        prepare(raw["items"], pairs, tmp_path / "b", format="microlens")
    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text("user,item,timestamp\nu1,1,5\nu1,12345,6\n")
    with pytest.raises(DataError, match=r"pairs.csv, line 3: item '12345' is not in the titles file"):
        prepare(raw["items"], pairs_csv, tmp_path / "c", format="microlens")
    covers = tmp_path / "covers.zip"  # item 5's cover missing, item 6's undecodable
    with zipfile.ZipFile(raw["images"]) as src, zipfile.ZipFile(covers, "w") as z:
        for n in src.namelist():
            if not n.endswith("/5.jpg"):
                z.writestr(n, b"not a jpeg" if n.endswith("/6.jpg") else src.read(n))
    with pytest.raises(DataError, match=r"no image for item '5'"):
        prepare(raw["items"], raw["users"], tmp_path / "d", images=covers, format="microlens")
    with pytest.raises(DataError, match=r"covers.zip/MicroLens-100k_covers/6.jpg: image cannot be decoded"):
        prepare(raw["items"], raw["users"], tmp_path / "e", images=covers, format="microlens", missing_images="blank")


def test_captions_one_per_item_greedy_and_recorded(ml, llava, tmp_path):
    raw, data_dir = ml
    data = PreparedData.load(data_dir)
    a = caption(data_dir, _spec(llava), "cover", tmp_path / "a")
    b = caption(data_dir, _spec(llava), "cover", tmp_path / "b")
    texts, meta = read_captions(tmp_path / "a", data)
    assert len(texts) == data.n_items + 1 and sum(bool(t) for t in texts) > 100
    assert texts == read_captions(tmp_path / "b", data)[0] and a["fingerprint"] == b["fingerprint"]  # greedy
    assert len(set(texts[1:])) > 50  # captions depend on the picture
    assert meta["prompt"].startswith("Describe this video cover") and meta["max_new_tokens"] == 6
    from iisan.extract.caption import COVER_EXAMPLES, VIDEO_EXAMPLES

    assert all(e in meta["prompt"] for e in COVER_EXAMPLES)  # the paper's in-context examples
    assert meta["decoding"] == "greedy" and meta["weights"] and meta["source"] == "cover"
    assert not (tmp_path / "a.parts").exists()
    default_video = caption(data_dir, _spec(llava, chunk_items=200), "video", tmp_path / "dv", frames=raw["frames"])
    assert default_video["prompt"].startswith("These are three evenly spaced frames")
    assert all(e in default_video["prompt"] for e in VIDEO_EXAMPLES)
    video = caption(data_dir, _spec(llava, prompt="What happens?"), "video", tmp_path / "v", frames=raw["frames"])
    assert video["prompt"] == "What happens?" and video["n_missing_pictures"] == 0
    assert video["fingerprint"] != a["fingerprint"]
    # three evenly spaced frames of five: the first, the middle and the last
    from iisan.data.microlens import FrameSource

    assert FrameSource(raw["frames"]).frames["3"] == [f"3/{k}.jpg" for k in range(1, 6)]
    model = Captioner(_spec(llava))
    assert model.prompt_text(3, "P").count("<image>") == 3


def test_missing_pictures_and_empty_captions_are_counted(ml, llava, tmp_path, monkeypatch):
    raw, _ = ml
    with zipfile.ZipFile(raw["images"]) as src, zipfile.ZipFile(tmp_path / "covers.zip", "w") as z:
        for n in src.namelist():
            if not n.endswith(("/5.jpg", "/6.jpg")):
                z.writestr(n, src.read(n))
    prepare(raw["items"], raw["users"], tmp_path / "data", images=tmp_path / "covers.zip", format="microlens",
            missing_images="blank")  # fmt: skip
    call = Captioner.__call__
    monkeypatch.setattr(Captioner, "__call__", lambda self, pics, prompt: ["" if i % 10 == 0 else t
                        for i, t in enumerate(call(self, pics, prompt))])  # fmt: skip
    s = caption(tmp_path / "data", _spec(llava), "cover", tmp_path / "c")
    texts, _ = read_captions(tmp_path / "c", PreparedData.load(tmp_path / "data"))
    assert texts[5] == texts[6] == "" and s["n_missing_pictures"] == 2
    assert s["n_empty_captions"] == sum(1 for t in texts[1:] if not t) - 2 > 0


def test_killed_captioning_resumes_and_a_changed_prompt_starts_over(ml, llava, tmp_path):
    _, data_dir = ml
    spec = {"model": str(llava), "max_new_tokens": 6, "batch_size": 1, "chunk_items": 8}
    out = tmp_path / "cap"
    args = ["caption", "--data", data_dir, "--source", "cover", "--captioner", json.dumps(spec), "--out", out]
    p = iisan_started(*args)
    parts = tmp_path / "cap.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("chunk-*.tsv"))) < 3:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)  # a real kill, mid-run
    p.wait()
    p.stdout.close()
    done = len(list(parts.glob("chunk-*.tsv")))
    assert 3 <= done < 15 and not out.exists(), "captioning finished before it could be killed"
    r = iisan(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["generated_now"] == 120 - 8 * done  # only the missing chunks
    fresh = caption(data_dir, CaptionSpec(**spec), "cover", tmp_path / "fresh")
    data = PreparedData.load(data_dir)
    assert read_captions(out, data)[0] == read_captions(tmp_path / "fresh", data)[0]
    # parts made under another prompt are discarded, never mixed in
    p = iisan_started(*args)
    while time.time() < deadline + 60 and len(list(parts.glob("chunk-*.tsv"))) < 2:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    changed = caption(data_dir, CaptionSpec(**spec, prompt="Name the colour."), "cover", tmp_path / "cap")
    assert changed["generated_now"] == 120 and changed["prompt"] == "Name the colour."
    assert changed["fingerprint"] != fresh["fingerprint"]


def test_caption_caches_record_their_field_and_serve_either_tower(ml, llava, tiny, tmp_path):
    from iisan.extract.specs import BackboneSpec

    _, data_dir = ml
    data = PreparedData.load(data_dir)
    summary = caption(data_dir, _spec(llava), "cover", tmp_path / "cover")
    bert = BackboneSpec(model=str(tiny["tiny-bert"]))
    extract(data_dir, bert, {}, tmp_path / "cover.zarr", captions=tmp_path / "cover", chunk_items=64)
    extract(data_dir, bert, {}, tmp_path / "title.zarr", chunk_items=64)
    arr, attrs = cache.load(tmp_path / "cover.zarr")
    assert attrs["field"] == "cover_caption" and attrs["input_fingerprint"] == summary["fingerprint"]
    assert cache.load(tmp_path / "title.zarr")[1]["field"] == "title"
    assert not np.array_equal(arr, cache.load(tmp_path / "title.zarr")[0])  # captions, not titles, were encoded
    feats = CachedFeatures(data, {"text": tmp_path / "title.zarr", "image": tmp_path / "cover.zarr"})
    text, image = feats(torch.tensor([1, 2]))
    assert text.shape == image.shape == (2, 7, 64)
    other, titles = tmp_path / "other", tmp_path / "titles.csv"
    titles.write_text("1,a retitled item\n" + Path(ml[0]["items"]).read_text().split("\n", 1)[1])
    prepare(titles, ml[0]["users"], other, format="microlens")
    with pytest.raises(DataError, match="captions were made for another item table"):
        extract(other, bert, {}, tmp_path / "x.zarr", captions=tmp_path / "cover", chunk_items=64)


def test_fft_reads_a_caption_field(ml, llava, tiny, tmp_path):
    # Table IX's single-text rows are FFT of BERT on one caption field
    from iisan.extract.backbones import Backbone
    from iisan.extract.specs import BackboneSpec
    from iisan.train.model import Inputs, build
    from iisan.train.settings import ModelConfig

    _, data_dir = ml
    data = PreparedData.load(data_dir)
    caption(data_dir, _spec(llava), "cover", tmp_path / "cover")
    texts, meta = read_captions(tmp_path / "cover", data)
    bert = BackboneSpec(model=str(tiny["tiny-bert"]))
    inputs = Inputs.of(backbones={"text": bert}, captions={"text": str(tmp_path / "cover")})
    model = build(ModelConfig(method="fft"), data, inputs, torch.device("cpu"))
    tokenise = Backbone(bert, torch.device("cpu")).encode_inputs
    seen = model.items.inputs["text"]([3, 7])
    assert torch.equal(seen["input_ids"], tokenise([texts[3], texts[7]])["input_ids"])  # the captions' tokens
    assert not torch.equal(seen["input_ids"], tokenise([data.titles[3], data.titles[7]])["input_ids"])
    assert model.sources.identities["text"]["captions_fingerprint"] == meta["fingerprint"]
    assert inputs.record()["captions"] == {"text": str((tmp_path / "cover").resolve())}
    with pytest.raises(Exception, match="--text-captions: captions are read by a backbone in the loop"):
        Inputs.of(caches={"text": "x.zarr"}, captions={"text": str(tmp_path / "cover")})


def test_captioning_never_replaces_what_iisan_did_not_make(ml, llava, tmp_path):
    from iisan.core.errors import OutputError
    from iisan.core.outputs import MARKER

    _, data_dir = ml
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("a user's file")
    with pytest.raises(OutputError, match="mine exists and was not made by iisan"):
        caption(data_dir, _spec(llava), "cover", user)  # refused before any captioning
    parts = tmp_path / "cap.parts"  # iisan's marker, but a file iisan did not write beside the chunks
    parts.mkdir()
    (parts / MARKER).write_text(json.dumps({"kind": "caption-parts", "identity": {}}))
    (parts / "notes.txt").write_text("a user's file")
    with pytest.raises(OutputError, match=r"cap.parts was not made by iisan or holds files it did not write"):
        caption(data_dir, _spec(llava), "cover", tmp_path / "cap")
    assert (parts / "notes.txt").read_text() == "a user's file" and (user / "notes.txt").is_file()


def test_the_video_captioner_config_loads(llava, tmp_path):
    """The workflow hands captioners JSON, whose keys are strings: GPU ids come back as ints
    through the spec base that backbones share (accelerate refuses a device "0")."""
    from iisan.extract.caption import Captioner
    from iisan.pipeline.config import validate
    from iisan.pipeline.workflow import Workflow

    from conftest import REPO, merged_config

    w = Workflow(validate(merged_config()))
    spec = CaptionSpec.from_config(json.loads(w.captioner_json("microlens", "video")), "--captioner")
    assert spec.max_memory == {0: "20GiB", "cpu": "96GiB"} and spec.device_map == "auto"
    assert (REPO / spec.offload_folder).parent.name == "offload"
    # the same path on this machine's devices: placed by accelerate under max_memory, and captioning
    entry = {"model": str(llava), "device_map": "auto", "max_memory": {"cpu": "2GiB"},
             "offload_folder": str(tmp_path / "off"), "max_new_tokens": 4}  # fmt: skip
    cap = Captioner(CaptionSpec.from_config(entry, "--captioner"), "cpu")
    assert {p.device.type for p in cap.model.parameters()} == {"cpu"}
    from PIL import Image

    assert len(cap([[Image.new("RGB", (32, 32), (200, 30, 30))]], "Describe.")) == 1
