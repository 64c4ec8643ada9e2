"""Nothing lost, nothing mixed, the same numbers twice: every entry point a user
can get wrong, and what a crash or a kill leaves behind."""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from iisan.core.errors import CacheMismatchError, DataError, OutputError
from iisan.core.outputs import MARKER
from iisan.data.prepare import prepare
from iisan.data.prepared import PreparedData

from conftest import QUICK, fit, iisan, iisan_started, read_json, write


def _raw(tmp_path, n=6, users="u\t{seq}\n"):
    items = write(tmp_path / "items.tsv", "".join(f"A{i}\tt{i}\n" for i in range(n)))
    return items, write(tmp_path / "users.tsv", users.format(seq=" ".join(f"A{i}" for i in range(n))))


# --- data loss


def test_prepare_out_dot_refuses_the_working_directory_and_deletes_nothing(tmp_path):
    items, users = _raw(tmp_path)
    work = tmp_path / "work"
    write(work / "thesis.tex", "years of work")
    r = iisan("prepare", "--items", items, "--users", users, "--out", ".", cwd=work)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{work} exists and was not made by iisan" in r.stderr and "refusing to replace it" in r.stderr
    assert (work / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(work)) == ["thesis.tex"]


def test_an_iisan_folder_is_replaced_but_not_one_holding_a_users_file(tmp_path):
    items, users = _raw(tmp_path)
    out = tmp_path / "data"
    prepare(items, users, out)
    assert json.loads((out / MARKER).read_text())["kind"] == "prepared-dataset"
    prepare(items, users, out)  # iisan's own folder: replaced
    write(out / "notes.txt", "mine")
    with pytest.raises(OutputError, match=r"holds 1 file\(s\) iisan did not write \(e\.g\. \['notes\.txt'\]\)"):
        prepare(items, users, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_build_tiny_refuses_a_folder_it_did_not_make(tmp_path):
    from iisan.extract.tiny import build_tiny

    write(tmp_path / "model" / "weights.bin", "someone's model")
    r = iisan("build-tiny", "tiny-bert", "--out", tmp_path / "model")
    assert r.returncode == 2 and f"{tmp_path / 'model'} exists and was not made by iisan" in r.stderr
    assert (tmp_path / "model/weights.bin").read_text() == "someone's model"
    with pytest.raises(OutputError):
        build_tiny("tiny-bert", tmp_path / "model")


def test_a_crash_while_preparing_leaves_the_old_output_whole_and_no_half_one(tmp_path, monkeypatch):
    items, users = _raw(tmp_path)
    out = tmp_path / "data"
    prepare(items, users, out)
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", boom)  # popularity.npy: after items, users and splits are written
    with pytest.raises(KeyboardInterrupt):
        prepare(items, write(tmp_path / "u2.tsv", "v\tA0 A1 A2 A3 A4\n"), out)
    assert sorted(p.name for p in out.iterdir()) == before and PreparedData.load(out).meta["n_users"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


# --- input text


def test_a_byte_order_mark_is_not_part_of_the_first_asin_or_user(tmp_path):
    items = tmp_path / "items.tsv"
    items.write_bytes(b"\xef\xbb\xbfA0\tfirst\nA1\tsecond\nA2\tthird\n")
    users = tmp_path / "users.tsv"
    users.write_bytes(b"\xef\xbb\xbfu1\tA0 A1 A2 A0 A1\n")
    prepare(items, users, tmp_path / "out")
    d = PreparedData.load(tmp_path / "out")
    assert d.asins[1:] == ["A0", "A1", "A2"] and (tmp_path / "out/users.tsv").read_text().startswith("u1\t")


def test_bytes_that_are_not_utf8_name_the_file_and_line_and_an_encoding_reads_them(tmp_path):
    items = tmp_path / "items.tsv"
    items.write_bytes("A0\tplain\nA1\tCaf\u00e9 scale\nA2\tx\n".encode("latin-1"))
    users = write(tmp_path / "users.tsv", "u\tA0 A1 A2 A0 A1\n")
    with pytest.raises(DataError, match=r"items\.tsv, line 2: bytes .* are not valid utf-8\n  fix: .*`encoding:`"):
        prepare(items, users, tmp_path / "out")
    prepare(items, users, tmp_path / "out", encoding="latin-1")
    assert PreparedData.load(tmp_path / "out").titles[2] == "Caf\u00e9 scale"


def test_control_characters_in_titles_are_cleaned_so_prepare_reads_back(tmp_path):
    titles = ["line&#13;break", "tab\there?", "vertical\x0btab", "sep\u2028arator", "nul&#0;char", "bell\x07"]
    items = tmp_path / "items.tsv"
    items.write_text("".join(f"A{i}\t{t}\n" for i, t in enumerate(titles)).replace("tab\there", "tab&#9;here"))
    users = write(tmp_path / "users.tsv", "u\tA0 A1 A2 A3 A4 A5\n")
    prepare(items, users, tmp_path / "out")
    d = PreparedData.load(tmp_path / "out")
    assert d.n_items == 6 and d.titles[1:] == [
        "line break",
        "tab here?",
        "vertical tab",
        "sep arator",
        "nul\ufffdchar",
        "bell",
    ]


def test_a_user_listed_twice_is_an_error_naming_both_lines(tmp_path):
    items, _ = _raw(tmp_path)
    users = write(tmp_path / "users.tsv", "u1\tA0 A1 A2 A3 A4\nu2\tA1 A2 A3 A4 A5\nu1\tA5 A4 A3 A2 A1\n")
    with pytest.raises(DataError, match=r"users\.tsv, line 3: user 'u1' appears twice \(lines 1 and 3\)"):
        prepare(items, users, tmp_path / "out")


# --- the command line gets the schema's validation


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--min-seq-len", "2"], "`min_seq_len`=2: 2 is less than the minimum of 3"),
        (["--max-seq-len", "0"], "`max_seq_len`=0: 0 is less than the minimum of 1"),
        (["--images", "NOTLMDB"], "not an image LMDB"),
    ],
)
def test_prepare_rejects_what_the_schema_forbids(tmp_path, args, needle):
    items, users = _raw(tmp_path)
    write(tmp_path / "NOTLMDB", "just text")
    args = [str(tmp_path / a) if a == "NOTLMDB" else a for a in args]
    r = iisan("prepare", "--items", items, "--users", users, "--out", tmp_path / "out", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_non_ascii_asin_with_an_lmdb_is_looked_up_not_crashed_on(tmp_path):
    import pickle

    import lmdb
    from test_data import LMDB_Image

    items = write(tmp_path / "items.tsv", "A0\tx\nB\u00e9\ty\nA2\tz\n")
    users = write(tmp_path / "users.tsv", "u\tA0 B\u00e9 A2 A0 B\u00e9\n")
    env = lmdb.open(str(tmp_path / "img.lmdb"), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        for key in ("A0", "B\u00e9"):
            txn.put(key.encode(), pickle.dumps(LMDB_Image(np.zeros((4, 4, 3), np.uint8), key)))
    env.close()
    meta = prepare(items, users, tmp_path / "out", images=tmp_path / "img.lmdb", missing_images="blank")
    assert meta["missing_images"] == 1 and PreparedData.load(tmp_path / "out").image_keys[1:] == ["A0", "B\u00e9", ""]


@pytest.mark.parametrize(
    "settings, needle",
    [
        ('{"epochs": "3"}', "`epochs`='3': '3' is not of type 'integer'"),
        ('{"batch_size": 1}', "`batch_size`=1: 1 is less than the minimum of 2"),
        ('{"lr": -0.1}', "`lr`=-0.1: -0.1 is less than or equal to the minimum of 0"),
        ('{"epochs": 1, "lr": 1e30, "lr_san": 1e30}', "the training loss became nan in epoch 1"),
    ],
)
def test_train_rejects_bad_settings_and_a_diverging_loss_without_a_traceback(
    small_demo, caches, tmp_path, settings, needle
):
    _, data_dir = small_demo
    r = iisan("train", "--data", data_dir, "--text-cache", caches["text"], "--settings", settings, "--out", tmp_path)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_misspelled_backbone_key_on_the_command_line_is_an_error(tiny, small_demo, tmp_path):
    _, data_dir = small_demo
    spec = json.dumps({"model": str(tiny["tiny-bert"]), "max_text_length": 20})
    r = iisan("extract", "--data", data_dir, "--backbone", spec, "--store", tmp_path / "x.zarr")
    assert r.returncode == 2 and "backbone: unknown key(s) ['max_text_length']" in r.stderr, r.stderr
    assert not (tmp_path / "x.zarr").exists()


# --- caches


def test_replacing_a_local_models_weights_is_a_new_cache_never_a_resumed_one(tiny, small_demo, tmp_path):
    from iisan.extract.extraction import extract
    from iisan.extract.specs import BackboneSpec
    from iisan.extract.tiny import build_tiny

    _, data_dir = small_demo
    model = tmp_path / "my-bert"
    shutil.copytree(tiny["tiny-bert"], model)
    spec = BackboneSpec(model=str(model))
    store = tmp_path / "c.zarr"
    extract(data_dir, spec, {"n": 3}, store, chunk_items=128)
    other = build_tiny("tiny-bert", tmp_path / "other", seed=7)
    shutil.copy(other / "model.safetensors", model / "model.safetensors")  # same name, same size, new weights
    with pytest.raises(CacheMismatchError, match=r"weights: cached '[0-9a-f]+', asked '[0-9a-f]+'"):
        extract(data_dir, spec, {"n": 3}, store, chunk_items=128)
    stats = extract(data_dir, spec, {"n": 3}, store, chunk_items=128, on_mismatch="rebuild")
    assert stats["chunks_done_now"] == stats["chunks_total"]  # every chunk made again from the new weights


def test_a_stale_store_that_iisan_did_not_make_is_never_deleted(tiny, small_demo, tmp_path):
    from iisan.extract.extraction import extract
    from iisan.extract.specs import BackboneSpec

    _, data_dir = small_demo
    store = tmp_path / "c.zarr"
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-bert"])), {"n": 3}, store, chunk_items=128)
    write(store / "README", "my notes")
    with pytest.raises(CacheMismatchError, match="is not a cache iisan made; refusing to delete it"):
        extract(data_dir, BackboneSpec(model=str(tiny["tiny-bert"])), {"n": 4}, store, on_mismatch="rebuild")
    assert (store / "README").is_file()


# --- training runs


def test_same_seed_same_bytes_with_several_threads(small_demo, caches, tmp_path):
    _, data_dir = small_demo
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = fit(data_dir, tmp_path / "a", caches, **QUICK)
        b = fit(data_dir, tmp_path / "b", caches, **QUICK)
    finally:
        torch.set_num_threads(threads)
    assert a["test"] == b["test"] and a["history"][-1]["loss"] == b["history"][-1]["loss"]
    sa, sb = (torch.load(tmp_path / r / "model.pt", weights_only=False)["state_dict"] for r in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a/ranks.npz").read_bytes() == (tmp_path / "b/ranks.npz").read_bytes()


def _train_cli(data_dir, caches, out, seed):
    settings = json.dumps({**QUICK, "epochs": 6, "patience": 6, "seed": seed})
    return [
        "train",
        "--data",
        str(data_dir),
        "--text-cache",
        str(caches["text"]),
        "--image-cache",
        str(caches["image"]),
        "--settings",
        settings,
        "--out",
        str(out),
    ]


def test_a_killed_run_resumes_to_the_uninterrupted_metrics_and_never_mixes_outputs(small_demo, caches, tmp_path):
    _, data_dir = small_demo
    run = tmp_path / "run"
    assert iisan(*_train_cli(data_dir, caches, run, seed=1)).returncode == 0
    old = read_json(run / "metrics.json")
    # a new run into the same folder, killed after its second epoch
    seen = len((run / "train.log").read_text())
    p = iisan_started(*_train_cli(data_dir, caches, run, seed=2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and "epoch   2" not in (run / "train.log").read_text()[seen:]:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    resume = torch.load(run / "resume.pt", weights_only=False)
    assert 1 <= resume["state"]["epoch"] < 6, "the run finished before it could be killed"
    # the folder holds no finished run: nothing of the old one beside the new one's state
    assert not any((run / f).exists() for f in ("metrics.json", "model.pt", "efficiency.json", "gates.json"))
    r = iisan(*_train_cli(data_dir, caches, run, seed=2))
    assert r.returncode == 0, r.stderr
    assert f"resuming after epoch {resume['state']['epoch']}" in r.stderr
    resumed = read_json(run / "metrics.json")
    assert iisan(*_train_cli(data_dir, caches, tmp_path / "straight", seed=2)).returncode == 0
    straight = read_json(tmp_path / "straight/metrics.json")
    assert resumed["valid"] == straight["valid"] and resumed["test"] == straight["test"] and resumed != old
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert (run / "ranks.npz").read_bytes() == (tmp_path / "straight/ranks.npz").read_bytes()
    assert not (run / "resume.pt").exists()
    # every attempt appended to the log under its own header
    text = (run / "train.log").read_text()
    assert text.count("attempt started") == 3 and text.count("epoch   1  loss") == 2


def test_training_refuses_a_folder_holding_someone_elses_files(small_demo, tmp_path):
    _, data_dir = small_demo
    write(tmp_path / "out/metrics.json", "my own metrics")
    with pytest.raises(OutputError, match=r"holds files iisan did not write"):
        fit(data_dir, tmp_path / "out", method="pop")
    assert (tmp_path / "out/metrics.json").read_text() == "my own metrics"
