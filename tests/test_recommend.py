"""Use a trained run: the checkpoint rebuilds the model exactly, top-K works in
chunks with the same result, exported embeddings give the same top-K, and bad
input is named."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from iisan.core.errors import CacheMismatchError, CheckpointError, DataError
from iisan.extract.specs import BackboneSpec
from iisan.train.loop import rank_all
from iisan.train.metrics import hr_ndcg
from iisan.train.model import Recommender
from iisan.use.recommend import export_embeddings, recommend, top_k
from iisan.use.trained import load_run

from conftest import QUICK, fit, read_json, write


@pytest.fixture(scope="module")
def runs(small_demo, caches, tiny, tmp_path_factory):
    _, data_dir = small_demo
    root = tmp_path_factory.mktemp("runs")
    fit(data_dir, root / "iisan", caches, **QUICK)
    fit(data_dir, root / "id", method="id", **QUICK)
    fit(data_dir, root / "pop", method="pop")
    fit(
        data_dir,
        root / "lora",
        backbones={"text": BackboneSpec(model=str(tiny["tiny-bert"]))},
        method="lora",
        **dict(QUICK, epochs=1),
    )
    return root


@pytest.mark.parametrize("name", ["iisan", "id", "pop", "lora"])
def test_a_reloaded_run_reproduces_its_test_metrics_exactly(runs, name):
    model, data, ckpt = load_run(runs / name)
    m = read_json(runs / name / "metrics.json")
    sp = {k: torch.as_tensor(v) for k, v in data.splits.items()}
    ranks = rank_all(model, sp["test_input"], sp["test_target"], sp["test_history"], 2048)
    assert hr_ndcg(ranks, 10) == m["test"]
    assert np.array_equal(ranks.numpy(), np.load(runs / name / "ranks.npz")["test"])
    assert ckpt["config"]["method"] == name and ckpt["items"] == data.asins[1:] and ckpt["code"]
    assert isinstance(model, Recommender) and model.method.name == name


def test_the_checkpoint_describes_the_model_and_its_inputs(runs):
    ckpt = torch.load(runs / "iisan/model.pt", weights_only=False)
    cfg = ckpt["config"]
    assert (cfg["text_taps"], cfg["text_width"], cfg["image_taps"], cfg["image_width"], cfg["max_len"]) == (
        7,
        64,
        7,
        64,
        10,
    )
    assert ckpt["identities"]["text"]["layers"] == [0, 2, 4, 6, 8, 10, 12] and ckpt["identities"]["text"]["weights"]
    assert set(ckpt["inputs"]["caches"]) == {"text", "image"} and ckpt["dataset"]["n_items"] == cfg["n_items"]
    lora = torch.load(runs / "lora/model.pt", weights_only=False)["config"]
    assert lora["peft"] == {"lora_r": 8, "lora_alpha": 16, "adapter_bottleneck": 64}


def test_test_users_top_k_hits_are_the_test_hit_rate(runs):
    frame = recommend(runs / "iisan", k=10)
    m = read_json(runs / "iisan/metrics.json")
    _, data, _ = load_run(runs / "iisan")
    targets = dict(zip(frame["user"].unique(), data.splits["test_target"], strict=True))
    hits = frame[frame["item_id"] == frame["user"].map(targets)]
    assert len(hits) / len(targets) == pytest.approx(m["test"]["HR@10"])
    assert frame.groupby("user").size().eq(10).all() and list(frame.columns) == [
        "user",
        "rank",
        "item_id",
        "asin",
        "score",
        "title",
    ]
    # history items are excluded unless asked for
    history = dict(zip(frame["user"].unique(), data.splits["test_history"], strict=True))
    assert not any(i in set(history[u]) for u, i in zip(frame["user"], frame["item_id"], strict=True))


def test_chunked_top_k_equals_unchunked_on_a_catalogue_larger_than_a_chunk():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(300, 16, generator=g), torch.randn(5001, 16, generator=g)
    items[4000] = items[17]  # exact ties: the lower id wins either way
    items[2500] = items[17]
    exclude = torch.randint(0, 5001, (300, 12), generator=g)
    whole = top_k(users, items, exclude, 25, user_chunk=10_000, item_chunk=10_000)
    chunked = top_k(users, items, exclude, 25, user_chunk=37, item_chunk=700)
    assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[0], chunked[0])
    scores = users @ items.T  # brute force: order by (score desc, id asc), history and padding out
    for u in range(0, 300, 29):
        banned = set(exclude[u].tolist()) | {0}
        order = sorted((i for i in range(5001) if i not in banned), key=lambda i: (-scores[u, i].item(), i))
        assert chunked[1][u].tolist() == order[:25]


def test_top_k_breaks_many_ties_at_the_kth_score_by_the_lower_id():
    # integer embeddings: hundreds of items share each score, so the k-th place is always tied
    g = torch.Generator().manual_seed(1)
    users = torch.randint(-2, 3, (40, 4), generator=g).float()
    items = torch.randint(-2, 3, (3001, 4), generator=g).float()
    exclude = torch.randint(0, 3001, (40, 5), generator=g)
    scores_, ids = top_k(users, items, exclude, 10, user_chunk=7, item_chunk=300)
    scores = users @ items.T
    for u in range(40):
        banned = set(exclude[u].tolist()) | {0}
        order = sorted((i for i in range(3001) if i not in banned), key=lambda i: (-scores[u, i].item(), i))
        assert ids[u].tolist() == order[:10] and scores_[u].tolist() == [scores[u, i].item() for i in order[:10]]


def test_exported_embeddings_give_recommends_top_k(runs, tmp_path):
    export_embeddings(runs / "iisan", tmp_path / "emb", which="test")
    items, users = np.load(tmp_path / "emb/items.npy"), np.load(tmp_path / "emb/users.npy")
    assert items.dtype == np.float32 and items.shape[1] == 64
    assert (tmp_path / "emb/items.tsv").read_text().splitlines()[1].split("\t")[:2] == ["0", "1"]
    _, data, _ = load_run(runs / "iisan")
    full = np.vstack([np.zeros((1, items.shape[1]), np.float32), items])
    ids = top_k(torch.from_numpy(users), torch.from_numpy(full), torch.as_tensor(data.splits["test_history"]), 10)[1]
    frame = recommend(runs / "iisan", k=10)
    assert frame["item_id"].to_numpy().reshape(-1, 10).tolist() == ids.tolist()


def test_cli_writes_tsv_and_parquet_for_new_histories(runs, tmp_path):
    import pandas as pd

    _, data, _ = load_run(runs / "iisan")
    hist = write(tmp_path / "new.tsv", f"alice\t{data.asins[3]} {data.asins[5]}\nbob\t{data.asins[7]}\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "iisan",
            "recommend",
            "--run",
            str(runs / "iisan"),
            "--histories",
            str(hist),
            "--k",
            "5",
            "--out",
            str(tmp_path / "r.tsv"),
            str(tmp_path / "r.parquet"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    tsv = pd.read_csv(tmp_path / "r.tsv", sep="\t", keep_default_na=False)
    pq = pd.read_parquet(tmp_path / "r.parquet")
    assert tsv["user"].tolist() == ["alice"] * 5 + ["bob"] * 5 and tsv["item_id"].tolist() == pq["item_id"].tolist()
    assert not {3, 5} & set(tsv[tsv["user"] == "alice"]["item_id"])
    kept = recommend(runs / "iisan", k=300, histories=hist, keep_history=True)
    assert {3, 5} <= set(kept[kept["user"] == "alice"]["item_id"])


def test_bad_input_is_named(runs, tmp_path):
    with pytest.raises(DataError, match=r"1 user id\(s\) not in the run's dataset, e\.g\. \['nobody'\]"):
        recommend(runs / "iisan", which=str(write(tmp_path / "ids.txt", "nobody\n")))
    with pytest.raises(DataError, match=r"new\.tsv, line 2: history 'b' has ASIN\(s\) \['NOPE'\] not in the catalogue"):
        recommend(runs / "iisan", histories=write(tmp_path / "new.tsv", "a\tD001000003\nb\tNOPE\n"))
    with pytest.raises(CheckpointError, match="holds no trained model"):
        recommend(tmp_path)
    from iisan.data.prepare import prepare
    from iisan.data.synth import synthesize

    raw = synthesize(tmp_path / "raw", n_items=300, n_users=600, seed=2)
    prepare(raw["items"], raw["users"], tmp_path / "other", images=raw["images"])
    with pytest.raises(CheckpointError, match="trained on another dataset"):
        recommend(runs / "id", data_dir=tmp_path / "other")
    r = subprocess.run(
        [sys.executable, "-m", "iisan", "recommend", "--run", str(tmp_path), "--out", str(tmp_path / "a.tsv")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "holds no trained model" in r.stderr and "Traceback" not in r.stderr


def test_a_cache_of_other_layers_is_refused(runs, small_demo, tiny, tmp_path):
    from iisan.extract.extraction import extract

    _, data_dir = small_demo
    other = tmp_path / "t3.zarr"
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-bert"])), {"n": 6, "embedding": False}, other, chunk_items=128)
    with pytest.raises(
        CacheMismatchError, match=r"the text input of .* is not the one it was trained on \(layers differ\)"
    ):
        load_run(runs / "iisan", caches={"text": other})
