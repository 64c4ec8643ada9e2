import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SCIENTIFIC = REPO.parent / "shared" / "data" / "amazon" / "scientific"
SCI_ITEMS = SCIENTIFIC / "Industrial_and_Scientific_items.tsv"
SCI_USERS = SCIENTIFIC / "am_Industrial_and_Scientific_users.tsv"


def need_scientific():
    if not SCI_ITEMS.is_file():
        pytest.skip(f"real Scientific data not found at {SCIENTIFIC} (expected ../shared beside the repo)")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The four tiny backbones, built once per test session."""
    from iisan.tiny import build_tiny

    root = Path(os.environ.get("IISAN_TINY_DIR") or tmp_path_factory.mktemp("tiny"))
    return {k: build_tiny(k, root / k) for k in ("tiny-bert", "tiny-vit", "tiny-llama", "tiny-llama-gptq")}


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small generated dataset, prepared: (raw paths, prepared folder)."""
    from iisan.data import prepare
    from iisan.synth import synthesize

    root = tmp_path_factory.mktemp("demo")
    raw = synthesize(root / "raw", n_items=300, n_users=600, seed=1)
    prepare(raw["items"], raw["users"], root / "data", images=raw["images"])
    return raw, root / "data"


@pytest.fixture(scope="session")
def caches(tiny, small_demo, tmp_path_factory):
    """Stage-one caches of the small demo: {"text": tiny BERT store, "image": tiny ViT store}."""
    from iisan.backbones import BackboneSpec
    from iisan.extract import extract

    _, data_dir = small_demo
    root = tmp_path_factory.mktemp("caches")
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-bert"])), {}, root / "t.zarr", chunk_items=128)
    extract(data_dir, BackboneSpec(model=str(tiny["tiny-vit"]), modality="image"), {}, root / "v.zarr", chunk_items=128)
    return {"text": root / "t.zarr", "image": root / "v.zarr"}


def fit(data_dir, out, caches=None, backbones=None, **settings):
    """``iisan train`` in-process with flat settings (as config.yaml gives them)."""
    from iisan.settings import from_settings
    from iisan.train import train

    return train(data_dir, out, *from_settings(settings), caches=caches, backbones=backbones)


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
