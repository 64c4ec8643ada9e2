"""The hidden-state cache: one Zarr array per (dataset, backbone, layer selection).

Layout (``layout: 2`` in its attributes): ``<name>.zarr`` holds an array
``[N+1, K, H]`` float16 (row 0 = padding, zeros), in Zarr v3 shards of
``chunk_items`` items (one file each: the unit of resumption and of sharding)
whose inner chunks are single items, each followed by its CRC-32C checksum, as is
the shard's index. So a damaged byte is found in the row it damaged, and one item
is read in place with one positioned read of its ``K * H * 2 + 4`` bytes (the
offsets come from the shard's index) instead of a whole chunk; uncompressed,
because fp16 activations barely compress.

Progress is kept beside it in ``<name>.zarr.progress/``: one marker file per
finished chunk, written after the chunk, so a killed run (or a preempted shard)
redoes only chunks without a marker, and disjoint shards never write the same
file. A marker proves a chunk was written; its checksums prove it is still what
was written: ``verify`` reads every row back. The writers of a store hold its
lock (``iisan.extract.lock``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np

from iisan.core.errors import CacheMismatchError, DataError
from iisan.data.fields import FIELDS

log = logging.getLogger(__name__)

CHUNK_ITEMS = 1024  # items per shard: the unit of resumption and of sharding
LAYOUT = 2  # single-item inner chunks with CRC-32C, in shards of chunk_items
_EMPTY = np.uint64(2**64 - 1)  # the sharding index's mark of an inner chunk never written

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
    "layout",
    "code",
)


def n_chunks(attrs: dict) -> int:
    """Chunks along items, padding row 0 included."""
    return -(-(attrs["n_items"] + 1) // attrs["chunk_items"])


def progress_dir(store: Path) -> Path:
    return Path(f"{store}.progress")


def chunk_path(store, chunk: int) -> Path:
    """The shard file of a chunk (Zarr v3's default key encoding)."""
    return Path(store) / "c" / str(chunk) / "0" / "0"


def chunk_items_range(attrs: dict, chunk: int) -> tuple[int, int]:
    """(first, last) item id a chunk holds (row 0, the padding, is no item)."""
    c = attrs["chunk_items"]
    return max(chunk * c, 1), min((chunk + 1) * c, attrs["n_items"] + 1) - 1


class CacheWriter:
    """Creates or reopens a store and records finished chunks."""

    def __init__(self, store, attrs: dict, on_mismatch: str = "error"):
        import zarr
        from zarr.codecs import Crc32cCodec

        self.store = Path(store)
        self.attrs = {**attrs, "layout": LAYOUT}
        n, k, h, c = attrs["n_items"] + 1, len(attrs["layers"]), attrs["hidden"], attrs["chunk_items"]
        if self.store.exists():
            old = read_attrs(self.store)
            diff = {key: (old.get(key), self.attrs.get(key)) for key in IDENTITY_KEYS
                    if old.get(key) != self.attrs.get(key)}  # fmt: skip
            if diff:
                if on_mismatch != "rebuild":
                    lines = "\n".join(f"    {key}: cached {a!r}, asked {b!r}" for key, (a, b) in diff.items())
                    raise CacheMismatchError(
                        f"cache {self.store} was made with different settings:\n{lines}\n"
                        f"  fix: move {self.store} (and {progress_dir(self.store)}) away, "
                        "or re-run with --on-mismatch rebuild"
                    )
                log.warning("cache %s is stale (%s differ); rebuilding", self.store, ", ".join(diff))
                _remove(self.store, old)
        if not self.store.exists():
            self.store.parent.mkdir(parents=True, exist_ok=True)
            _remove_progress(self.store)
            zarr.create_array(store=str(self.store), shape=(n, k, h), chunks=(1, k, h), shards=(c, k, h),
                              dtype="float16", fill_value=0, compressors=[Crc32cCodec()],
                              attributes=self.attrs)  # fmt: skip
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

    def undo(self, chunk: int) -> None:
        """Forget a chunk's marker (a damaged chunk is extracted again)."""
        (progress_dir(self.store) / str(chunk)).unlink(missing_ok=True)


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


def read_attrs(store) -> dict:
    meta = Path(store) / "zarr.json"
    if not meta.is_file():
        raise DataError(store, "not a Zarr v3 array (no zarr.json)",
                        "give the path of a cache `iisan extract` made; if nothing is extracting into it "
                        "(an extraction holds its lock while it runs), move it away and extract again")  # fmt: skip
    return json.loads(meta.read_text()).get("attributes", {})


def missing_chunks(store) -> list[int]:
    store = Path(store)
    attrs = read_attrs(store)
    done = {p.name for p in progress_dir(store).iterdir()} if progress_dir(store).is_dir() else set()
    return [c for c in range(n_chunks(attrs)) if str(c) not in done]


class DamagedChunk(Exception):
    """A chunk whose bytes are not the ones written (checksum mismatch, truncation, a bad index)."""

    def __init__(self, chunk: int, problem: str):
        super().__init__(problem)
        self.chunk, self.problem = chunk, problem


class CacheReader:
    """A finished cache's rows by item id, read in place: one positioned read per row, every
    row's checksum checked, the last ``cache_rows`` rows read kept (a bounded LRU).

    Nothing of the store is held in memory beyond the shard indexes (16 bytes an item) and
    the LRU, so reading a cache larger than the host's memory is bounded by the batch."""

    def __init__(self, store, attrs: dict | None = None, cache_rows: int = 0):
        self.store = Path(store)
        self.attrs = attrs or read_attrs(self.store)
        if self.attrs.get("layout") != LAYOUT:
            layout = self.attrs.get("layout", 1)
            raise CacheMismatchError(f"cache {self.store} has layout {layout}; this iisan reads layout {LAYOUT}\n"
                                     "  fix: extract it again (`iisan extract` rebuilds it)")  # fmt: skip
        self.n_rows = self.attrs["n_items"] + 1
        self.k, self.h = len(self.attrs["layers"]), self.attrs["hidden"]
        self.row_bytes = self.k * self.h * 2
        self._index: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}
        self._lru: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_rows = cache_rows

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_rows, self.k, self.h)

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    def _items_in(self, chunk: int) -> int:
        c = self.attrs["chunk_items"]
        return min(c, self.n_rows - chunk * c)

    def index(self, chunk: int) -> np.ndarray:
        """(offset, nbytes) of each item of a chunk in its shard file, the index's checksum checked."""
        if chunk not in self._index:
            import google_crc32c

            c = self.attrs["chunk_items"]
            path = chunk_path(self.store, chunk)
            size = path.stat().st_size if path.is_file() else 0
            n_index = 16 * c + 4
            if size < n_index:
                raise DamagedChunk(chunk, f"its file {path} is {'missing' if not size else f'truncated ({size} B)'}")
            fd = self._fd(chunk)
            raw = os.pread(fd, n_index, size - n_index)
            if google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:  # the index is the file's end
                raise DamagedChunk(chunk, f"its file {path} is truncated or damaged (its index of item offsets "
                                          "fails its checksum)")  # fmt: skip
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(c, 2)
            used = index[: self._items_in(chunk)]
            written = used[:, 0] != _EMPTY
            ends = used[written, 0] + used[written, 1]
            if (used[written, 1] != self.row_bytes + 4).any() or (ends.size and ends.max() > size - n_index):
                raise DamagedChunk(chunk, "its index points outside the file or at rows of the wrong size")
            self._index[chunk] = index
        return self._index[chunk]

    def _fd(self, chunk: int) -> int:
        if chunk not in self._fds:
            if len(self._fds) >= 64:  # a bounded number of open files, whatever the catalogue's size
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[chunk] = os.open(chunk_path(self.store, chunk), os.O_RDONLY)
        return self._fds[chunk]

    def _read(self, item: int) -> np.ndarray:
        import google_crc32c

        chunk, local = divmod(item, self.attrs["chunk_items"])
        offset, nbytes = self.index(chunk)[local]
        if offset == _EMPTY:  # never written: the fill value (only the padding row, in a finished cache)
            return np.zeros((self.k, self.h), np.float16)
        raw = os.pread(self._fd(chunk), int(nbytes), int(offset))
        if len(raw) != nbytes or google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
            raise DamagedChunk(chunk, f"item {item} fails its checksum")
        return np.frombuffer(raw[:-4], dtype="<f2").reshape(self.k, self.h)

    def rows(self, ids) -> np.ndarray:
        """``(len(ids), K, H)`` float16 rows of these item ids (0 = the padding row)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.k, self.h), np.float16)
        try:
            for j, i in enumerate(ids.tolist()):
                row = self._lru.get(i) if self.cache_rows else None
                if row is None:
                    row = self._read(i)
                    if self.cache_rows:
                        self._lru[i] = row
                        if len(self._lru) > self.cache_rows:
                            self._lru.popitem(last=False)
                elif self.cache_rows:
                    self._lru.move_to_end(i)
                out[j] = row
        except DamagedChunk as e:
            raise self.damaged([e]) from None
        return out

    def read_all(self, check_finite: bool = True) -> np.ndarray:
        """Every row, ``(N+1, K, H)`` float16, each checksum checked (one chunk at a time)."""
        out = np.empty(self.shape, np.float16)
        c = self.attrs["chunk_items"]
        damaged = []
        for chunk in range(n_chunks(self.attrs)):
            lo, n = chunk * c, self._items_in(chunk)
            try:
                out[lo : lo + n] = self._chunk(chunk, n)
            except DamagedChunk as e:
                damaged.append(e)
                continue
            if check_finite:  # chunk by chunk: a whole-array check would hold a mask half the cache's size
                self._finite(out[lo : lo + n], lo)
        if damaged:
            raise self.damaged(damaged)
        return out

    def _chunk(self, chunk: int, n: int) -> np.ndarray:
        """A chunk's rows in one read of its file, each row's checksum checked."""
        import google_crc32c

        index = self.index(chunk)[:n]
        path = chunk_path(self.store, chunk)
        data = path.read_bytes()
        rows = np.zeros((n, self.k, self.h), np.float16)
        for j, (offset, nbytes) in enumerate(index.tolist()):
            if offset == int(_EMPTY):
                continue
            raw = data[offset : offset + nbytes]
            if len(raw) != nbytes or google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
                raise DamagedChunk(chunk, f"item {chunk * self.attrs['chunk_items'] + j} fails its checksum")
            rows[j] = np.frombuffer(raw[:-4], dtype="<f2").reshape(self.k, self.h)
        return rows

    def check(self, chunks=None) -> list[DamagedChunk]:
        """Every chunk (or these) read back against its checksums: the damaged ones (empty if none)."""
        found = []
        for chunk in range(n_chunks(self.attrs)) if chunks is None else chunks:
            try:
                self._chunk(chunk, self._items_in(chunk))
            except DamagedChunk as e:
                found.append(e)
        return found

    def damaged(self, found: list[DamagedChunk]) -> DataError:
        """The named error for damaged chunks: which, which items, and the repair."""
        lines = "; ".join(f"chunk {e.chunk} (items {'-'.join(map(str, chunk_items_range(self.attrs, e.chunk)))}): "
                          f"{e.problem}" for e in found[:5])  # fmt: skip
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        return DataError(self.store, f"{len(found)} damaged chunk(s): {lines}{more}",
                         "re-run `iisan extract` for this store (or the workflow): it re-extracts the damaged "
                         "chunks only, under the same identity checks as a resume")  # fmt: skip

    def _finite(self, rows: np.ndarray, first_id: int = 0) -> None:
        bad = ~np.isfinite(rows).all(axis=(1, 2))
        if bad.any():
            ids = (np.flatnonzero(bad) + first_id).tolist()
            raise DataError(self.store, f"{len(ids)} row(s) hold non-finite values (item ids {ids[:10]})",
                            "extract this cache again with a wider `dtype` (float32 or bfloat16)")  # fmt: skip

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


def verify(store, check_data: bool = True) -> dict:
    """Raise unless every chunk is finished and (``check_data``) still holds what was written:
    every row read back against its checksum. Returns the attributes."""
    missing = missing_chunks(store)
    if missing:
        raise DataError(store, f"{len(missing)} chunk(s) not extracted yet (first: {missing[:5]})",
                        "re-run `iisan extract` (or the missing shard jobs); finished chunks are kept")  # fmt: skip
    attrs = read_attrs(store)
    if check_data:
        reader = CacheReader(store, attrs)
        damaged = reader.check()
        if damaged:
            raise reader.damaged(damaged)
    return attrs


def expected_for(data, field: str) -> dict:
    """Attributes a cache of ``field`` (title, image, or a caption) must have to serve ``data``."""
    if not FIELDS[field].caption_source:
        fp = data.meta["text_fingerprint" if field == "title" else "image_fingerprint"]
        return {"input_fingerprint": fp, "n_items": data.n_items, "field": field}
    # captions carry their own fingerprint (recorded by the runs that read them); they must describe these items
    return {"data_fingerprint": data.meta["text_fingerprint"], "n_items": data.n_items, "field": field}


def open_reader(store, expect: dict | None = None, cache_rows: int = 0) -> CacheReader:
    """A finished cache's reader, refused unless its attributes match ``expect`` (e.g. the
    dataset's fingerprint): a mismatch is never silently trained on."""
    attrs = verify(store, check_data=False)
    for key, want in (expect or {}).items():
        if attrs.get(key) != want:
            raise CacheMismatchError(
                f"cache {store} has {key}={attrs.get(key)!r}, expected {want!r}\n"
                f"  fix: re-run `iisan extract` for this dataset and backbone"
            )
    return CacheReader(store, attrs, cache_rows)


def load(store, expect: dict | None = None) -> tuple[np.ndarray, dict]:
    """All items' selected layers in one read: ``(N+1, K, H)`` float16, every checksum checked,
    and the attributes."""
    reader = open_reader(store, expect)
    try:
        return reader.read_all(), reader.attrs
    finally:
        reader.close()


def info(store) -> dict:
    """Shape, dtype, bytes on disk, and what caching every layer would have cost."""
    store = Path(store)
    attrs = read_attrs(store)
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    n_rows, k, h = attrs["n_items"] + 1, len(attrs["layers"]), attrs["hidden"]
    full_k = attrs["n_layers"] + 1
    return {
        "store": str(store),
        "model": attrs["model"],
        "shape": [n_rows, k, h],
        "dtype": attrs["dtype"],
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
