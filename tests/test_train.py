"""Stage two from the cache: outputs, determinism, bad settings."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import read_json
from iisan.errors import CacheMismatchError, ConfigError
from iisan.extract import extract
from iisan.backbones import BackboneSpec
from iisan.train import TrainConfig, train


@pytest.fixture(scope="module")
def caches(tiny, small_demo, tmp_path_factory):
    _, data_dir = small_demo
    root = tmp_path_factory.mktemp("caches")
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-bert"])), {}, root / "t.zarr", chunk_items=128)
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-vit"]), modality="image"), {}, root / "v.zarr", chunk_items=128)
    return root / "t.zarr", root / "v.zarr"


QUICK = dict(epochs=3, patience=3, batch_size=64, lr=2e-3, lr_san=2e-3)


def test_outputs_and_same_seed_same_metrics(small_demo, caches, tmp_path):
    _, data_dir = small_demo
    m1 = train(data_dir, tmp_path / "a", TrainConfig(**QUICK), *caches)
    m2 = train(data_dir, tmp_path / "b", TrainConfig(**QUICK), *caches)
    assert m1["valid"] == m2["valid"] and m1["test"] == m2["test"]
    for f in ("metrics.json", "model.pt", "efficiency.json", "gates.json"):
        assert (tmp_path / "a" / f).is_file()
    m = read_json(tmp_path / "a/metrics.json")
    assert set(m["test"]) == {"HR@10", "NDCG@10"} and m["epochs_run"] == 3 and m["seed"] == 12345
    assert m["config"]["lr"] == 2e-3 and m["caches"]["text"]["layers"] == [0, 2, 4, 6, 8, 10, 12]
    assert 1 <= m["best_epoch"] <= 3 and len(m["history"]) == 3
    eff = read_json(tmp_path / "a/efficiency.json")
    assert eff["seconds_per_epoch"] > 0 and eff["peak_memory_bytes"] > 0 and eff["peak_memory_kind"] == "cpu_peak_rss"
    assert 0 < eff["trainable_parameters"] <= eff["total_parameters"]
    gates = read_json(tmp_path / "a/gates.json")
    assert set(gates) == {"text", "image", "inter"} and len(gates["text"]) == 7
    ckpt = torch.load(tmp_path / "a/model.pt", weights_only=False)
    assert ckpt["epoch"] == m["best_epoch"] and ckpt["config"]["method"] == "iisan"


def test_every_method_and_ablation_trains(small_demo, caches, tmp_path):
    _, data_dir = small_demo
    one = dict(QUICK, epochs=1)
    for name, kw, c in [("frozen", {"method": "frozen"}, caches), ("id", {"method": "id"}, (None, None)),
                        ("nointer", {"inter": False}, caches), ("nointra", {"intra": False}, caches),
                        ("nogate", {"learned_gates": False}, caches), ("text", {}, (caches[0], None))]:
        m = train(data_dir, tmp_path / name, TrainConfig(**one, **kw), *c)
        assert 0 <= m["test"]["HR@10"] <= 1, name
    pop = train(data_dir, tmp_path / "pop", TrainConfig(method="pop"))
    assert pop["test"]["HR@10"] > 0
    nogate = read_json(tmp_path / "nogate/gates.json")
    assert all(v == 0.5 for vals in nogate.values() for v in vals)


def test_cache_from_another_dataset_is_refused(tiny, caches, tmp_path):
    from iisan.data import prepare
    from iisan.synth import synthesize

    raw = synthesize(tmp_path / "raw", n_items=300, n_users=600, seed=2)  # same size, other titles
    prepare(raw["items"], raw["users"], tmp_path / "other", images=raw["images"])
    with pytest.raises(CacheMismatchError, match="input_fingerprint"):
        train(tmp_path / "other", tmp_path / "x", TrainConfig(**QUICK), *caches)


def test_bad_settings_are_rejected_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown train setting\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="`method`='bert'"):
        TrainConfig(method="bert")
    with pytest.raises(ConfigError, match="`d`=63 must be divisible by `heads`=2"):
        TrainConfig(d=63)
    r = subprocess.run([sys.executable, "-m", "iisan", "train", "--data", str(tmp_path / "x"), "--out", str(tmp_path / "y"),
                        "--settings", "{bad json"], capture_output=True, text=True)
    assert r.returncode == 2 and "--settings: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert "--settings: not valid JSON" in (tmp_path / "y/train.log").read_text()  # the run's log keeps the error


def test_cli_version_is_fast():
    import time

    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "iisan", "--version"], capture_output=True, text=True)
    assert r.stdout.strip().startswith("iisan ") and time.perf_counter() - t < 5
