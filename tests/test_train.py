"""Stage two from the cache: outputs, determinism, bad settings."""

import subprocess
import sys

import pytest
import torch

from iisan.core.device import resolve_device
from iisan.core.errors import CacheMismatchError, ConfigError
from iisan.core.measure import PeakMemory
from iisan.train.settings import from_settings

from conftest import QUICK, fit, iisan, read_json


def test_outputs_and_same_seed_same_metrics(small_demo, caches, tmp_path):
    _, data_dir = small_demo
    m1 = fit(data_dir, tmp_path / "a", caches, **QUICK)
    m2 = fit(data_dir, tmp_path / "b", caches, **QUICK)
    assert m1["valid"] == m2["valid"] and m1["test"] == m2["test"]
    for f in ("metrics.json", "model.pt", "efficiency.json", "gates.json"):
        assert (tmp_path / "a" / f).is_file()
    m = read_json(tmp_path / "a/metrics.json")
    assert set(m["test"]) == {"HR@10", "NDCG@10"} and m["epochs_run"] == 3 and m["seed"] == 12345
    assert m["config"]["lr"] == 2e-3 and m["caches"]["text"]["layers"] == [0, 2, 4, 6, 8, 10, 12]
    assert 1 <= m["best_epoch"] <= 3 and len(m["history"]) == 3
    eff = read_json(tmp_path / "a/efficiency.json")
    assert eff["seconds_per_epoch"] > 0 and eff["peak_memory_bytes"] > 0
    assert eff["peak_memory_kind"] == PeakMemory(resolve_device("auto")).kind  # of whichever device trained
    assert eff["device"] == str(resolve_device("auto"))
    assert 0 < eff["trainable_parameters"] <= eff["total_parameters"]
    gates = read_json(tmp_path / "a/gates.json")
    assert set(gates) == {"text", "image", "inter"} and len(gates["text"]) == 7
    ckpt = torch.load(tmp_path / "a/model.pt", weights_only=False)
    assert ckpt["epoch"] == m["best_epoch"] and ckpt["config"]["method"] == "iisan"


@pytest.mark.parametrize(
    "name, kw, inputs, towers",
    [
        ("frozen", {"method": "frozen"}, "both", None),
        ("id", {"method": "id"}, None, None),
        ("nointer", {"inter": False}, "both", {"text", "image"}),
        ("nointra", {"intra": False}, "both", {"inter"}),
        ("nogate", {"learned_gates": False}, "both", {"text", "image", "inter"}),
        ("text", {}, "text", {"text"}),
    ],
)
def test_every_method_and_ablation_trains(small_demo, caches, tmp_path, name, kw, inputs, towers):
    _, data_dir = small_demo
    given = {"both": caches, "text": {"text": caches["text"]}, None: None}[inputs]
    m = fit(data_dir, tmp_path / name, given, **dict(QUICK, epochs=1), **kw)
    assert m["epochs_run"] == 1 and set(m["caches"]) == set(given or {})
    gates = read_json(tmp_path / name / "gates.json")
    ckpt = torch.load(tmp_path / name / "model.pt", weights_only=False)
    params = ckpt["state_dict"]
    if towers is None:  # no SAN towers: the frozen head reads the last layers only, SASRec item ids only
        assert gates == {} and not any(k.startswith("items.text.") for k in params)
        assert any(k.startswith("items.head." if name == "frozen" else "items.emb.") for k in params)
    else:  # the ablation took effect: exactly these towers exist
        assert set(gates) == towers
        assert {t for t in ("text", "image", "inter") if any(k.startswith(f"items.{t}.") for k in params)} == towers
    assert all(m["model_config"][key] == value for key, value in kw.items() if key != "method")
    assert ckpt["config"]["method"] == kw.get("method", "iisan")
    if name == "nogate":
        assert all(v == 0.5 for vals in gates.values() for v in vals)
        assert all(not p.any() for k, p in params.items() if k.endswith("gates.w"))  # never moved from 0
    else:
        assert any(v != 0.5 for vals in gates.values() for v in vals) or towers is None


def test_popularity_ranks_by_training_counts(small_demo, tmp_path):
    import math

    import numpy as np

    from iisan.data.prepared import PreparedData

    _, data_dir = small_demo
    d = PreparedData.load(data_dir)
    pop = fit(data_dir, tmp_path / "pop", method="pop")
    counts = np.bincount(d.splits["train"].ravel(), minlength=d.n_items + 1)  # training occurrences per item
    hits = ndcg = 0.0
    for target, history in zip(d.splits["test_target"], d.splits["test_history"], strict=True):
        seen = set(history.tolist()) - {0}
        if target in seen:
            continue  # a repeated target is a miss
        rank = sum(1 for i in range(1, d.n_items + 1) if i != target and i not in seen and counts[i] >= counts[target])
        if rank < 10:
            hits, ndcg = hits + 1, ndcg + 1 / math.log2(rank + 2)
    n = len(d.splits["test_target"])
    assert pop["test"]["HR@10"] == pytest.approx(hits / n) and pop["test"]["NDCG@10"] == pytest.approx(ndcg / n)
    assert pop["test"]["HR@10"] > 0 and pop["epochs_run"] == 0


def test_cache_from_another_dataset_is_refused(caches, tmp_path):
    from iisan.data.prepare import prepare
    from iisan.data.synth import synthesize

    raw = synthesize(tmp_path / "raw", n_items=300, n_users=600, seed=2)  # same size, other titles
    prepare(raw["items"], raw["users"], tmp_path / "other", images=raw["images"])
    with pytest.raises(CacheMismatchError, match="input_fingerprint"):
        fit(tmp_path / "other", tmp_path / "x", caches, **QUICK)


def test_bad_settings_are_rejected_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown train setting\(s\) \['learning_rate'\]"):
        from_settings({"learning_rate": 1})
    with pytest.raises(ConfigError, match="`method`='bert'"):
        from_settings({"method": "bert"})
    with pytest.raises(ConfigError, match="`d`=63 must be divisible by `heads`=2"):
        from_settings({"d": 63})
    r = iisan("train", "--data", tmp_path / "x", "--out", tmp_path / "y", "--settings", "{bad json")
    assert r.returncode == 2 and "--settings: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert "--settings: not valid JSON" in (tmp_path / "y/train.log").read_text()  # the run's log keeps the error


def test_cli_version_is_fast_and_imports_no_torch():
    import time

    t = time.perf_counter()
    r = iisan("--version")
    assert r.stdout.strip().startswith("iisan ") and time.perf_counter() - t < 5
    probe = (
        "import sys, iisan.cli; iisan.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"  # the CLI imports what a command needs inside the command
