"""Raw-data reading, preparation and the demo generator."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iisan.core.errors import DataError
from iisan.data.images import ImageSource
from iisan.data.prepare import leave_one_out, prepare
from iisan.data.prepared import PreparedData
from iisan.data.synth import synthesize

from conftest import SCI_ITEMS, SCI_USERS, need_scientific, write


def test_scientific_reproduces_published_counts(tmp_path):
    need_scientific()
    meta = prepare(SCI_ITEMS, SCI_USERS, tmp_path / "sci")
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (12076, 20314, 81711)
    d = PreparedData.load(tmp_path / "sci")
    assert "&amp;" not in " ".join(d.titles) and any("&" in t for t in d.titles)  # entities decoded
    assert d.splits["test_input"].shape == (12076, 10) and d.splits["train"].shape == (12076, 11)
    assert d.popularity[0] == 0 and d.popularity.sum() == pytest.approx(1.0)


def test_leave_one_out_hand_case():
    s = leave_one_out([[1, 2, 3, 4, 5], [7, 8, 9, 6, 5, 4, 3, 2, 1, 9, 8, 7, 6]], max_seq_len=10)
    assert s["train"][0].tolist() == [0] * 8 + [1, 2, 3]
    assert s["valid_input"][0].tolist() == [0] * 7 + [1, 2, 3] and s["valid_target"][0] == 4
    assert s["test_input"][0].tolist() == [0] * 6 + [1, 2, 3, 4] and s["test_target"][0] == 5
    assert s["test_history"][0].tolist() == [0] * 8 + [1, 2, 3, 4]
    # 13 items: train keeps 11, inputs keep the last 10
    assert s["train"][1].tolist() == [7, 8, 9, 6, 5, 4, 3, 2, 1, 9, 8]
    assert s["valid_input"][1].tolist() == [8, 9, 6, 5, 4, 3, 2, 1, 9, 8] and s["valid_target"][1] == 7
    assert s["test_input"][1].tolist() == [9, 6, 5, 4, 3, 2, 1, 9, 8, 7] and s["test_target"][1] == 6


def test_prepare_filters_truncates_and_numbers_in_items_file_order(tmp_path):
    items = write(tmp_path / "items.tsv", "".join(f"A{i}\tTitle {i} &amp; co\n" for i in range(20)))
    seq_long = " ".join(f"A{i}" for i in range(15))  # 15 items -> last 13 kept
    users = write(tmp_path / "users.tsv", f"u1\t{seq_long}\nu2\tA19 A18 A17\nu3\tA19 A0 A1 A2 A3\n")
    meta = prepare(items, users, tmp_path / "out")
    d = PreparedData.load(tmp_path / "out")
    assert meta["n_users"] == 2 and meta["n_interactions"] == 13 + 5  # u2 (3 items) dropped
    # universe: u1 keeps A2..A14 (last 13); u3 adds A0, A1 and A19; ids follow the items file
    assert d.asins[1:] == [f"A{i}" for i in range(15)] + ["A19"]
    assert d.titles[1] == "Title 0 & co"
    counts = np.bincount(d.splits["train"].ravel(), minlength=d.n_items + 1)
    assert d.popularity[1:] == pytest.approx(counts[1:] / counts[1:].sum())


@pytest.mark.parametrize(
    "content, line, needle",
    [
        ("A1\tok\nA2\tbad\textra\n", 2, "expected 2 tab-separated columns, found 3"),
        ("A1 no tab here\n", 1, "expected 2 tab-separated columns, found 1"),
    ],
)
def test_malformed_items_line_names_file_line_and_fix(tmp_path, content, line, needle):
    items = write(tmp_path / "items.tsv", content)
    users = write(tmp_path / "users.tsv", "u\tA1 A1 A1 A1 A1\n")
    with pytest.raises(DataError) as e:
        prepare(items, users, tmp_path / "out")
    msg = str(e.value)
    assert f"{items}, line {line}" in msg and needle in msg and "fix:" in msg and "ASIN<TAB>title" in msg


def test_unknown_item_in_sequence(tmp_path):
    items = write(tmp_path / "items.tsv", "A1\tx\nA2\ty\n")
    users = write(tmp_path / "users.tsv", "u1\tA1 A2 A1 A2 A1\nu2\tA1 A9 A2 A1 A2\n")
    with pytest.raises(
        DataError, match=r"users.tsv, line 2: user 'u2' names item 'A9', which is not in the items file"
    ):
        prepare(items, users, tmp_path / "out")


def test_empty_file(tmp_path):
    items = write(tmp_path / "items.tsv", "")
    with pytest.raises(DataError, match=r"items file is empty\n  fix: point `items` at a non-empty"):
        prepare(items, write(tmp_path / "users.tsv", "u\tA1\n"), tmp_path / "out")


def _img_dataset(tmp_path, n=6):
    items = write(tmp_path / "items.tsv", "".join(f"A{i}\tt{i}\n" for i in range(n)))
    users = write(tmp_path / "users.tsv", "u\t" + " ".join(f"A{i}" for i in range(n)) + "\n")
    (tmp_path / "img").mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "img" / f"A{i}.jpg")
    return items, users, tmp_path / "img"


def test_undecodable_image(tmp_path):
    items, users, img = _img_dataset(tmp_path)
    (img / "A3.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError) as e:
        prepare(items, users, tmp_path / "out", images=img)
    assert str(img / "A3.jpg") in str(e.value) and "cannot be decoded" in str(e.value) and "fix:" in str(e.value)


def test_missing_image_error_or_blank_with_counted_warning(tmp_path, caplog):
    items, users, img = _img_dataset(tmp_path)
    (img / "A2.jpg").unlink()
    (img / "A4.jpg").unlink()
    with pytest.raises(DataError, match=r"no image for item 'A2'.*\n  fix: .*missing_images: blank"):
        prepare(items, users, tmp_path / "out", images=img)
    meta = prepare(items, users, tmp_path / "out", images=img, missing_images="blank")
    assert meta["missing_images"] == 2
    assert "2 of 6 items have no image" in caplog.text
    assert PreparedData.load(tmp_path / "out").image_keys[1:] == ["A0.jpg", "A1.jpg", "", "A3.jpg", "", "A5.jpg"]


class LMDB_Image:  # the authors' record class, as their build script pickles it
    def __init__(self, image, id):
        self.channels, self.size, self.image, self.id = image.shape[2], image.shape[:2], image.tobytes(), id


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_authors_lmdb_is_read_without_unpickling_arbitrary_objects(tmp_path):
    import lmdb

    arr = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    env = lmdb.open(str(tmp_path / "am_x.lmdb"), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"A1", pickle.dumps(LMDB_Image(arr, "A1")))
        txn.put(b"EVIL", pickle.dumps(Evil()))
    env.close()
    src = ImageSource(tmp_path / "am_x.lmdb")
    assert src.kind == "lmdb" and src.locate("A1") == "A1" and src.locate("A2") is None
    assert np.array_equal(np.asarray(src.load("A1")), arr)
    with pytest.raises(DataError, match=r"refusing to load posix.system|refusing to load os.system"):
        src.load("EVIL")


def test_synth_is_deterministic_multimodal_and_prepares(tmp_path):
    import json

    a = synthesize(tmp_path / "a", n_items=120, n_users=200, seed=3)
    b = synthesize(tmp_path / "b", n_items=120, n_users=200, seed=3)
    for k in ("items", "users"):
        assert Path(a[k]).read_text() == Path(b[k]).read_text()
    assert (tmp_path / "a/images").joinpath(
        sorted(p.name for p in (tmp_path / "a/images").iterdir())[0]
    ).read_bytes() == (tmp_path / "b/images").joinpath(
        sorted(p.name for p in (tmp_path / "b/images").iterdir())[0]
    ).read_bytes()
    truth = json.loads((tmp_path / "a/truth.json").read_text())
    titles = dict(line.split("\t") for line in Path(a["items"]).read_text().splitlines())
    for asin, t in truth["items"].items():  # kind only in the title, colour never in it
        assert t["kind"] in titles[asin] and not any(c in titles[asin].lower().split() for c in truth["colours"])
    meta = prepare(a["items"], a["users"], tmp_path / "p", images=a["images"])
    assert meta["n_users"] == 200 and meta["missing_images"] == 0


def test_a_missing_image_lmdb_says_where_the_papers_images_come_from(tmp_path):
    # config.yaml's scientific entry points at the authors' LMDB layout, which no checkout ships
    where = r"(?s)am_is\.lmdb: image folder/LMDB not found.*GAIR-Lab/IISAN.*build_lmdb\.py"
    with pytest.raises(DataError, match=where):
        ImageSource(tmp_path / "data/amazon/Scientific/am_is.lmdb")
