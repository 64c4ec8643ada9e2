"""The live endpoint (a real HTTP client against `iisan serve` on a loopback port) and the
faiss index of a run's item embeddings."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from iisan.use.recommend import export_embeddings, recommend

from conftest import QUICK, fit


@pytest.fixture(scope="module")
def run(small_demo, caches, tmp_path_factory):
    _, data_dir = small_demo
    out = tmp_path_factory.mktemp("serve") / "iisan"
    fit(data_dir, out, caches, **dict(QUICK, epochs=1))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url, body=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    p = subprocess.Popen([sys.executable, "-m", "iisan", "--log", str(log), "serve", "--run", str(run),
                          "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if _call(f"{base}/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        p.kill()
        raise AssertionError(f"the server did not come up:\n{log.read_text()}")
    yield base
    p.terminate()
    p.wait(timeout=30)


def test_a_known_user_gets_recommend_s_next_lists(server, run):
    status, health = _call(f"{server}/health")
    assert status == 200 and health["status"] == "ok" and health["search"] == "exact" and health["k"] == 10
    frame = recommend(run, k=5, which="next")
    user = frame["user"].iloc[0]
    status, got = _call(f"{server}/users/{user}/recommendations?k=5")
    assert status == 200 and got["user"] == user and got["k"] == 5
    assert [i["item_id"] for i in got["items"]] == frame[frame["user"] == user]["item_id"].tolist()
    assert [i["score"] for i in got["items"]] == pytest.approx(frame[frame["user"] == user]["score"].tolist())


def test_a_posted_history_is_a_new_user_with_its_items_left_out(server, run, tmp_path):
    from iisan.use.trained import load_run

    _, data, _ = load_run(run)
    history = [data.asins[3], data.asins[5], data.asins[8]]
    (tmp_path / "h.tsv").write_text("alice\t" + " ".join(history) + "\n")
    frame = recommend(run, k=10, histories=tmp_path / "h.tsv")
    status, got = _call(f"{server}/recommendations", {"history": history, "k": 10})
    assert status == 200 and [i["asin"] for i in got["items"]] == frame["asin"].tolist()
    assert not set(history) & {i["asin"] for i in got["items"]}
    status, kept = _call(f"{server}/recommendations", {"history": history, "k": 10, "keep_history": True})
    assert status == 200 and len(kept["items"]) == 10


@pytest.mark.parametrize(
    "path, body, code, says",
    [
        ("/users/nobody/recommendations", None, 404, "user 'nobody' is not in the run's dataset"),
        ("/recommendations", {"history": ["NOT-AN-ASIN"]}, 422, "ASIN(s) ['NOT-AN-ASIN'] are not in the run's"),
        ("/recommendations", {"history": []}, 422, "at least 1"),
        ("/users/U00000/recommendations?k=0", None, 422, "greater than or equal to 1"),
    ],
)
def test_bad_requests_are_4xx_that_say_what_to_send(server, path, body, code, says):
    status, got = _call(f"{server}{path}", body)
    assert status == code and says in json.dumps(got), got


def test_the_faiss_index_finds_the_exact_top_10_and_can_serve(run, tmp_path):
    from iisan.use import index as ann
    from iisan.use.serve import Service

    written = export_embeddings(run, tmp_path / "emb", index="faiss")
    info = json.loads((tmp_path / "emb/index.json").read_text())
    assert written["index"] == info
    assert info["recall@10"] >= 0.95, info
    assert info["n_items"] == len(np.load(tmp_path / "emb/items.npy"))
    exact, approx = Service(run), Service(run, index=tmp_path / "emb/items.faiss")
    assert approx.health()["search"] == "faiss HNSW"
    user = next(iter(exact.sequences))
    a, b = exact.recommend(exact.sequences[user], 10), approx.recommend(approx.sequences[user], 10)
    assert len({i["item_id"] for i in a["items"]} & {i["item_id"] for i in b["items"]}) >= 8
    assert not {i["item_id"] for i in b["items"]} & set(exact.sequences[user])  # history left out through the index
    with pytest.raises(Exception, match="no index here"):
        ann.load(tmp_path / "missing.faiss")


def test_recall_counts_ties_with_the_kth_and_the_search_breadth_is_tuned_to_the_target(monkeypatch):
    from iisan.use import index as ann

    # items 1 and 2 are the same vector (a duplicate title): either is the right 2nd item
    items = np.array([[3.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 1.0]], np.float32)
    user = np.array([[1.0, 0.0]], np.float32)
    index = ann.build(items)
    _, got = ann.search(index, user, 2)
    assert got[0, 0] == 1 and got[0, 1] in (2, 3)
    assert ann.recall(index, items, user, np.array([2.0]), 2) == 1.0  # whichever twin came back
    assert ann.recall(index, items, user, np.array([2.5]), 2) == 0.5  # a k-th score only item 1 reaches
    breadths = []

    def recall_at(index, *a, **kw):  # reaches the target from the third breadth on
        breadths.append(index.hnsw.hnsw.efSearch)
        return 0.9 if len(breadths) < 3 else 0.96

    monkeypatch.setattr(ann, "recall", recall_at)
    assert ann.tune(index, items, user, np.array([2.0]), 2) == ann.EF_STEPS[2] == index.hnsw.hnsw.efSearch
    assert breadths == list(ann.EF_STEPS[:3])
