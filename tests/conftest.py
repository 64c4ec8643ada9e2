import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# digests remembered by the tests stay with them (iisan.core.digests)
os.environ.setdefault("IISAN_CACHE_DIR", str(Path(__import__("tempfile").mkdtemp(prefix="iisan-test-cache-"))))

REPO = Path(__file__).resolve().parents[1]
SCIENTIFIC = REPO.parent / "shared" / "data" / "amazon" / "scientific"
SCI_ITEMS = SCIENTIFIC / "Industrial_and_Scientific_items.tsv"
SCI_USERS = SCIENTIFIC / "am_Industrial_and_Scientific_users.tsv"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu-check runs these on one)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


# the one set of quick training settings (a test that needs more epochs says so: dict(QUICK, epochs=6))
QUICK = dict(epochs=3, patience=3, batch_size=64, lr=2e-3, lr_san=2e-3)


def _command(args) -> list[str]:
    return [sys.executable, "-m", "iisan", *map(str, args)]


def iisan(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """``python -m iisan ARGS`` run to its end (stdout and stderr as text); ``env`` adds variables."""
    env = dict(os.environ, TQDM_DISABLE="1", **(env or {}))
    return subprocess.run(_command(args), capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def iisan_started(*args, **popen) -> subprocess.Popen:
    """``python -m iisan ARGS`` started, for tests that kill it (stdout and stderr together)."""
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.Popen(
        _command(args), **{"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "env": env, **popen}
    )


def need_scientific():
    if not SCI_ITEMS.is_file():
        pytest.skip(f"real Scientific data not found at {SCIENTIFIC} (expected ../shared beside the repo)")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The four tiny backbones, built once per test session."""
    from iisan.extract.tiny import build_tiny

    root = Path(os.environ.get("IISAN_TINY_DIR") or tmp_path_factory.mktemp("tiny"))
    return {k: build_tiny(k, root / k) for k in ("tiny-bert", "tiny-vit", "tiny-llama", "tiny-llama-gptq")}


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small generated dataset, prepared: (raw paths, prepared folder)."""
    from iisan.data.prepare import prepare
    from iisan.data.synth import synthesize

    root = tmp_path_factory.mktemp("demo")
    raw = synthesize(root / "raw", n_items=300, n_users=600, seed=1)
    prepare(raw["items"], raw["users"], root / "data", images=raw["images"])
    return raw, root / "data"


@pytest.fixture(scope="session")
def caches(tiny, small_demo, tmp_path_factory):
    """Stage-one caches of the small demo: {"text": tiny BERT store, "image": tiny ViT store}."""
    from iisan.extract.extraction import extract
    from iisan.extract.specs import BackboneSpec

    _, data_dir = small_demo
    root = tmp_path_factory.mktemp("caches")
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-bert"])), {}, root / "t.zarr", chunk_items=128)
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-vit"]), modality="image"), {}, root / "v.zarr", chunk_items=128)
    return {"text": root / "t.zarr", "image": root / "v.zarr"}


def fit(data_dir, out, caches=None, backbones=None, **settings):
    """``iisan train`` in-process with flat settings (as config.yaml gives them)."""
    from iisan.train.loop import train
    from iisan.train.model import Inputs
    from iisan.train.settings import from_settings

    return train(data_dir, out, *from_settings(settings), Inputs.of(caches, backbones))


def merged_config(*overlays) -> dict:
    """config.yaml with scenario files over it, merged as Snakemake merges --configfile (recursively)."""
    import yaml

    def merge(base, over):
        for key, value in over.items():
            base[key] = (
                merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
            )
        return base

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for path in overlays:
        merge(config, yaml.safe_load(Path(path).read_text()))
    return config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_json(p):
    return json.loads(Path(p).read_text())
