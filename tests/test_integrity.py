"""Nothing damaged or mixed is certified: real files broken on disk (a flipped byte, a truncated
chunk), a second real writer against a store, non-finite values, a local model changed in the
middle of its weights, a stage run from another folder, full and unwritable disks."""

import json
import os
import resource
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from iisan.core.errors import CacheMismatchError, ConfigError, DataError, ExtractionError, OutputError
from iisan.data.prepared import PreparedData
from iisan.extract import cache
from iisan.extract.backbones import Backbone, weights_fingerprint
from iisan.extract.extraction import extract
from iisan.extract.specs import BackboneSpec

from conftest import QUICK, fit, iisan, iisan_started, write


@pytest.fixture
def store(caches, tmp_path):
    """A copy of the session's finished text cache (128-item chunks), to damage."""
    dst = tmp_path / "t.zarr"
    shutil.copytree(caches["text"], dst)
    shutil.copytree(f"{caches['text']}.progress", f"{dst}.progress")
    return dst


def _damage(store, chunk: int, how: str) -> None:
    path = cache.chunk_path(store, chunk)
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one byte in the middle of the rows, as a failing disk or a stray write leaves it
        raw[len(raw) // 3] ^= 0x40
        path.write_bytes(raw)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_chunk_is_named_by_verify_and_by_training(small_demo, store, tmp_path, how):
    _, data_dir = small_demo
    _damage(store, 1, how)
    r = iisan("cache-verify", "--store", store, "--done", tmp_path / "t.done")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "t.done").exists()
    want = "is truncated or damaged" if how == "truncate" else "fails its checksum"
    assert "1 damaged chunk(s): chunk 1 (items 128-255)" in r.stderr and want in r.stderr, r.stderr
    assert "re-run `iisan extract` for this store" in r.stderr
    with pytest.raises(DataError, match=r"damaged chunk\(s\): chunk 1 \(items 128-255\)"):
        fit(data_dir, tmp_path / "run", {"text": store}, **dict(QUICK, epochs=1))


def test_extract_repairs_only_the_damaged_chunk(tiny, small_demo, store, caplog):
    _, data_dir = small_demo
    before, _ = cache.load(store)
    _damage(store, 2, "flip")
    caplog.set_level("WARNING", logger="iisan.extract.extraction")
    stats = extract(data_dir, BackboneSpec(model=str(tiny["tiny-bert"])), {}, store, chunk_items=128)
    assert stats["chunks_repaired"] == 1 and stats["chunks_done_now"] == 1
    last = PreparedData.load(data_dir).n_items
    assert f"chunk 2 (items 256-{last}) is damaged" in caplog.text and "extracting it again" in caplog.text
    after, _ = cache.load(store)  # every checksum holds again, and the rows are the ones extracted before
    assert np.array_equal(before, after)


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    s = tmp_path / "slow.zarr"
    spec = json.dumps({"model": str(tiny["tiny-llama"]), "batch_size": 1})  # slow enough to be caught mid-run
    args = ["extract", "--data", data_dir, "--backbone", spec, "--store", s, "--chunk-items", "8"]
    first = iisan_started(*args, "--done", tmp_path / "first.done")
    deadline = time.time() + 120
    while time.time() < deadline and not (cache.progress_dir(s).is_dir() and any(cache.progress_dir(s).iterdir())):
        time.sleep(0.02)  # until it holds the lock and has finished a chunk
    assert first.poll() is None, "the first extraction ended before a second could start"
    second = iisan(*args)
    assert second.returncode == 2 and f"is being written by process {first.pid}" in second.stderr, second.stderr
    assert "delete" not in second.stderr and "Traceback" not in second.stderr
    first.send_signal(signal.SIGKILL)  # its registration stays behind, naming a dead process
    first.wait()
    first.stdout.close()
    assert list((tmp_path / "slow.zarr.lock").glob("*.json"))
    third = iisan(*args, "--done", tmp_path / "third.done")
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock of {s}: process {first.pid}" in third.stderr
    assert not list((tmp_path / "slow.zarr.lock").glob("*.json"))  # released at the end


def test_non_finite_pooled_states_are_refused_with_the_fix(tiny, small_demo, tmp_path, monkeypatch):
    _, data_dir = small_demo
    forward = Backbone.forward

    def overflowing(self, inputs, layers, trainable=False):
        out = forward(self, inputs, layers, trainable)
        out[0, -1, 0] = float("inf")  # a half-precision overflow in the last tap of one item
        return out

    monkeypatch.setattr(Backbone, "forward", overflowing)
    msg = r"gave non-finite pooled states .*for \d+ item\(s\), ids \[\d+.*layer\(s\) \[12\]\n  fix: .*`dtype: float32`"
    with pytest.raises(ExtractionError, match=msg):
        extract(data_dir, BackboneSpec(model=str(tiny["tiny-bert"])), {}, tmp_path / "x.zarr", chunk_items=128)


def test_a_non_finite_row_in_a_cache_is_refused_before_training(small_demo, store, tmp_path):
    import zarr

    _, data_dir = small_demo
    arr = zarr.open_array(str(store), mode="r+")
    row = arr[7]
    row[3, 5] = np.nan
    arr[7] = row  # written through zarr: the checksums hold, the value is not finite
    for residency in ("device", "disk"):
        with pytest.raises(DataError, match=r"1 row\(s\) hold non-finite values \(item ids \[7\]\)") as e:
            fit(data_dir, tmp_path / residency, {"text": store}, **dict(QUICK, epochs=1), residency=residency)
        assert "lower `lr`" not in str(e.value)


def test_non_finite_scores_are_the_worst_never_a_hit():
    from iisan.train.metrics import rank_of_target
    from iisan.use.recommend import top_k

    items = torch.tensor([[0.0], [1.0], [2.0], [float("nan")], [3.0]])  # item 3's embedding is not finite
    users = torch.ones(2, 1)  # so a user's score for item i is items[i]
    ranks = rank_of_target(users, items, torch.tensor([3, 4]), torch.zeros(2, 1, dtype=torch.long))
    assert ranks.tolist() == [5, 0]  # a NaN target is a miss, never a hit; a NaN elsewhere never beats a target
    _, ids = top_k(users, items, None, 4)
    assert ids[0].tolist() == [4, 2, 1, -1]  # never recommended: 3 items are all there is to give


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_setting_is_refused(value, tmp_path):
    from iisan.train.settings import from_settings

    with pytest.raises(ConfigError, match="is not a finite number"):
        from_settings({"lr": float(value.replace("Infinity", "inf"))})
    r = iisan("train", "--data", tmp_path, "--out", tmp_path / "o", "--settings", f'{{"lr": {value}}}')
    assert r.returncode == 2 and "is not a finite number" in r.stderr and "Traceback" not in r.stderr


def test_a_weight_changed_anywhere_changes_the_fingerprint_and_is_never_mixed(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    model = tmp_path / "bert"
    shutil.copytree(tiny["tiny-bert"], model)
    fp = weights_fingerprint(model)
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2 + 12345] ^= 0x01  # one bit of one tensor, between any sampled blocks
    weights.write_bytes(raw)
    assert weights_fingerprint(model) != fp
    # a store begun with the model, then asked to resume with the changed one: refused, never mixed
    s = tmp_path / "s.zarr"
    shutil.copytree(tiny["tiny-bert"], tmp_path / "orig")
    extract(data_dir, BackboneSpec(model=str(tmp_path / "orig")), {}, s, chunk_items=128, shard=0, nshards=3,
            init_only=True)  # fmt: skip
    extract(data_dir, BackboneSpec(model=str(tmp_path / "orig")), {}, s, chunk_items=128, shard=0, nshards=3)
    (tmp_path / "orig/model.safetensors").write_bytes(raw)
    with pytest.raises(CacheMismatchError, match=r"weights: cached '\w+', asked '\w+'"):
        extract(data_dir, BackboneSpec(model=str(tmp_path / "orig")), {}, s, chunk_items=128, shard=1, nshards=3)


def test_a_stage_reads_the_same_files_from_another_folder(tiny, tmp_path):
    from PIL import Image

    from iisan.data.prepare import prepare
    from iisan.data.synth import synthesize

    here = tmp_path / "project"
    raw = synthesize(here / "raw", n_items=60, n_users=100, seed=3)
    shutil.copytree(raw["images"], here / "img")
    elsewhere = tmp_path / "img"  # another folder of the same name, beside where a later job runs
    shutil.copytree(raw["images"], elsewhere)
    for p in elsewhere.iterdir():
        Image.new("RGB", (32, 32), (0, 200, 0)).save(p)
    spec = BackboneSpec(model=str(tiny["tiny-vit"]), modality="image")
    old = os.getcwd()
    try:
        os.chdir(here)
        prepare(raw["items"], raw["users"], "data", images="img")  # relative, as a user types it
        extract("data", spec, {}, here / "v.zarr")
        os.chdir(tmp_path)  # the same dataset, extracted from another folder
        extract(here / "data", spec, {}, tmp_path / "v.zarr")
    finally:
        os.chdir(old)
    assert PreparedData.load(here / "data").meta["sources"]["images"] == str(here / "img")
    assert np.array_equal(cache.load(tmp_path / "v.zarr")[0], cache.load(here / "v.zarr")[0])


def _fsize_limit(limit):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_full_and_unwritable_disks_are_named_errors(tiny, small_demo, caches, tmp_path):
    raw, data_dir = small_demo
    unwritable = "/sys/iisan-test-output"  # sysfs refuses new entries, even to root
    full = dict(preexec_fn=_fsize_limit(50_000))  # a write past 50 kB fails, as on a full disk
    runs = {
        "prepare": ["prepare", "--items", raw["items"], "--users", raw["users"], "--out"],
        "extract": ["extract", "--data", data_dir, "--backbone", json.dumps({"model": str(tiny["tiny-bert"])}),
                    "--store"],
        "train": ["train", "--data", data_dir, "--text-cache", caches["text"], "--settings", '{"epochs": 1}', "--out"],
    }  # fmt: skip
    for name, args in runs.items():
        r = iisan(*args, f"{unwritable}/{name}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert f"cannot write {unwritable}" in r.stderr and "fix:" in r.stderr, (name, r.stderr[-2000:])
    for name in ("prepare", "train"):
        out = tmp_path / f"full-{name}"
        p = subprocess.run([*_cli(runs[name]), str(out)], capture_output=True, text=True, **full)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (name, p.stderr[-2000:])
        assert "cannot write" in p.stderr and "File too large" in p.stderr and "fix:" in p.stderr, p.stderr[-2000:]


def _cli(args):
    import sys

    return [sys.executable, "-m", "iisan", *map(str, args)]


def test_recommend_refuses_k_below_one_and_says_what_it_cannot_give(small_demo, caches, tmp_path, caplog):
    from iisan.use.recommend import recommend

    _, data_dir = small_demo
    fit(data_dir, tmp_path / "run", method="pop")
    for k in (0, -3):
        r = iisan("recommend", "--run", tmp_path / "run", "--k", k, "--out", tmp_path / "r.tsv")
        assert r.returncode == 2 and f"`k`={k}: recommend at least one item" in r.stderr and "Traceback" not in r.stderr
    data = PreparedData.load(data_dir)
    everything = " ".join(data.asins[1:])
    hist = write(tmp_path / "h.tsv", f"all\t{everything}\nsome\t{data.asins[1]}\n")
    caplog.set_level("WARNING", logger="iisan.use.recommend")
    frame = recommend(tmp_path / "run", k=data.n_items + 5, histories=hist, keep_history=False)
    assert f"k={data.n_items + 5} is more than the {data.n_items} items of the catalogue" in caplog.text
    assert "1 user(s) have nothing left to recommend" in caplog.text and ": all" in caplog.text
    assert set(frame["user"]) == {"some"} and len(frame) == data.n_items - 1


def test_max_seq_len_is_bounded(small_demo, tmp_path):
    raw, _ = small_demo
    r = iisan(
        "prepare", "--items", raw["items"], "--users", raw["users"], "--max-seq-len", 100000, "--out", tmp_path / "x"
    )
    assert r.returncode == 2 and "`max_seq_len`=100000: 100000 is greater than the maximum of 1000" in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_users_empty_folder_inside_an_iisan_folder_is_kept(small_demo, tmp_path):
    from iisan.data.prepare import prepare

    raw, _ = small_demo
    out = tmp_path / "data"
    prepare(raw["items"], raw["users"], out)
    (out / "my notes").mkdir()
    with pytest.raises(OutputError, match=r"holds 1 file\(s\) iisan did not write \(e.g. \['my notes/'\]\)"):
        prepare(raw["items"], raw["users"], out)
    assert (out / "my notes").is_dir()


def test_a_changed_captions_table_is_refused(tmp_path):
    from iisan.extract.caption_table import read_captions

    folder = tmp_path / "cap"
    table = "id\titem\tcaption\n1\tA\ta red cube\n"
    import hashlib

    write(folder / "captions.tsv", table)
    meta = {"items_fingerprint": "f", "n_items": 1, "table_sha256": hashlib.sha256(table.encode()).hexdigest()}
    write(folder / "captions.json", json.dumps(meta))

    class Data:
        meta, n_items, asins, root = {"text_fingerprint": "f"}, 1, ["", "A"], tmp_path

    assert read_captions(folder, Data())[0] == ["", "a red cube"]
    write(folder / "captions.tsv", table.replace("red", "blue"))
    with pytest.raises(DataError, match=r"does not match the checksum captions\.json records"):
        read_captions(folder, Data())
