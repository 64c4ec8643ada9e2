"""The hidden-state cache: one Zarr array per (dataset, backbone, layer selection).

Layout: ``<name>.zarr`` holds an array ``[N+1, K, H]`` float16 (row 0 = padding,
zeros), chunked along items, uncompressed (fp16 activations barely compress).
Its attributes record what made it. Progress is kept beside it in
``<name>.zarr.progress/``: one empty marker file per finished chunk, written
after the chunk, so a killed run (or a preempted shard) redoes only chunks
without a marker, and disjoint shards never write the same file.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from iisan.core.errors import CacheMismatchError, DataError
from iisan.data.fields import FIELDS

log = logging.getLogger(__name__)

CHUNK_ITEMS = 1024  # items per Zarr chunk: the unit of resumption and of sharding

# attributes that must agree for an existing store to be reused
IDENTITY_KEYS = (
    "model",
    "revision",
    "weights",
    "modality",
    "layers",
    "pooling",
    "dtype",
    "max_text_len",
    "image_size",
    "input_fingerprint",
    "n_items",
    "hidden",
    "chunk_items",
    "code",
)


def n_chunks(attrs: dict) -> int:
    """Chunks along items, padding row 0 included."""
    return -(-(attrs["n_items"] + 1) // attrs["chunk_items"])


def progress_dir(store: Path) -> Path:
    return Path(f"{store}.progress")


class CacheWriter:
    """Creates or reopens a store and records finished chunks."""

    def __init__(self, store, attrs: dict, on_mismatch: str = "error"):
        import zarr

        self.store = Path(store)
        self.attrs = attrs
        n, k, h, c = attrs["n_items"] + 1, len(attrs["layers"]), attrs["hidden"], attrs["chunk_items"]
        if self.store.exists():
            old = _read_attrs(self.store)
            diff = {key: (old.get(key), attrs.get(key)) for key in IDENTITY_KEYS if old.get(key) != attrs.get(key)}
            if diff:
                if on_mismatch != "rebuild":
                    lines = "\n".join(f"    {key}: cached {a!r}, asked {b!r}" for key, (a, b) in diff.items())
                    raise CacheMismatchError(
                        f"cache {self.store} was made with different settings:\n{lines}\n"
                        f"  fix: delete {self.store} (and {progress_dir(self.store)}), "
                        "or re-run with --on-mismatch rebuild"
                    )
                log.warning("cache %s is stale (%s differ); rebuilding", self.store, ", ".join(diff))
                _remove(self.store, old)
        if not self.store.exists():
            self.store.parent.mkdir(parents=True, exist_ok=True)
            _remove_progress(self.store)
            zarr.create_array(
                store=str(self.store),
                shape=(n, k, h),
                chunks=(c, k, h),
                dtype="float16",
                fill_value=0,
                compressors=None,
                attributes=attrs,
            )
        self.array = zarr.open_array(str(self.store), mode="r+")
        progress_dir(self.store).mkdir(exist_ok=True)

    @property
    def n_chunks(self) -> int:
        return n_chunks(self.attrs)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        c = self.attrs["chunk_items"]
        return chunk * c, min((chunk + 1) * c, self.array.shape[0])

    def is_done(self, chunk: int) -> bool:
        return (progress_dir(self.store) / str(chunk)).exists()

    def write_chunk(self, chunk: int, rows: np.ndarray) -> None:
        lo, hi = self.chunk_rows(chunk)
        assert rows.shape == (hi - lo, *self.array.shape[1:]), rows.shape
        if lo == 0:
            rows[0] = 0  # padding row
        self.array[lo:hi] = rows.astype(np.float16)
        (progress_dir(self.store) / str(chunk)).touch()


def _remove(store: Path, attrs: dict) -> None:
    """Delete a stale store, only if iisan made it: a Zarr array with iisan's attributes and nothing else."""
    expected = {"zarr.json", "c"}
    if (
        not {"model", "layers", "input_fingerprint", "code"} <= set(attrs)
        or not {p.name for p in store.iterdir()} <= expected
    ):
        raise CacheMismatchError(f"{store} is not a cache iisan made; refusing to delete it\n"
                                 f"  fix: move it away, or give the cache another path")  # fmt: skip
    shutil.rmtree(store)
    _remove_progress(store)


def _remove_progress(store: Path) -> None:
    """Drop the chunk markers of a store being (re)created (empty files named by chunk number)."""
    progress = progress_dir(store)
    if not progress.is_dir():
        return
    if any(not p.name.isdigit() or p.is_dir() for p in progress.iterdir()):
        raise CacheMismatchError(f"{progress} holds files iisan did not write; refusing to delete it\n"
                                 f"  fix: move it away")  # fmt: skip
    shutil.rmtree(progress)


def _read_attrs(store: Path) -> dict:
    meta = Path(store) / "zarr.json"
    if not meta.is_file():
        raise DataError(store, "not a Zarr v3 array (no zarr.json)", f"delete {store} and re-run `iisan extract`")
    return json.loads(meta.read_text()).get("attributes", {})


def missing_chunks(store) -> list[int]:
    store = Path(store)
    attrs = _read_attrs(store)
    done = {p.name for p in progress_dir(store).iterdir()} if progress_dir(store).is_dir() else set()
    return [c for c in range(n_chunks(attrs)) if str(c) not in done]


def verify(store) -> dict:
    """Raise unless every chunk is finished; return the attributes."""
    missing = missing_chunks(store)
    if missing:
        raise DataError(
            store,
            f"{len(missing)} chunk(s) not extracted yet (first: {missing[:5]})",
            "re-run `iisan extract` (or the missing shard jobs); finished chunks are kept",
        )
    return _read_attrs(store)


def expected_for(data, field: str) -> dict:
    """Attributes a cache of ``field`` (title, image, or a caption) must have to serve ``data``."""
    if not FIELDS[field].caption_source:
        fp = data.meta["text_fingerprint" if field == "title" else "image_fingerprint"]
        return {"input_fingerprint": fp, "n_items": data.n_items, "field": field}
    # captions carry their own fingerprint (recorded by the runs that read them); they must describe these items
    return {"data_fingerprint": data.meta["text_fingerprint"], "n_items": data.n_items, "field": field}


def load(store, expect: dict | None = None) -> tuple[np.ndarray, dict]:
    """All items' selected layers in one read: ``(N+1, K, H)`` float16, and the attributes.

    ``expect`` maps attribute names to required values (e.g. the dataset's
    fingerprint); a mismatch is refused rather than silently trained on.
    """
    import zarr

    attrs = verify(store)
    for key, want in (expect or {}).items():
        if attrs.get(key) != want:
            raise CacheMismatchError(
                f"cache {store} has {key}={attrs.get(key)!r}, expected {want!r}\n"
                f"  fix: re-run `iisan extract` for this dataset and backbone"
            )
    return np.ascontiguousarray(zarr.open_array(str(store), mode="r")[...]), attrs


def info(store) -> dict:
    """Shape, dtype, bytes on disk, and what caching every layer would have cost."""
    import zarr

    store = Path(store)
    attrs = _read_attrs(store)
    arr = zarr.open_array(str(store), mode="r")
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    n_rows, k, h = arr.shape
    full_k = attrs["n_layers"] + 1
    return {
        "store": str(store),
        "model": attrs["model"],
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "layers": attrs["layers"],
        "bytes_on_disk": on_disk,
        "bytes_selected": n_rows * k * h * 2,
        "bytes_all_layers": n_rows * full_k * h * 2,
        "all_layers": full_k,
        "missing_chunks": len(missing_chunks(store)),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
