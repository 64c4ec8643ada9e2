"""Item images: a folder of ``{ASIN}.jpg`` or the authors' LMDB layout.

The authors' LMDB maps ``ASIN`` (ascii) to a pickled ``LMDB_Image`` object
(attributes ``channels``, ``size``, ``image`` = raw uint8 bytes, ``id``).
We read it with an unpickler that knows that one class and nothing else, so
a tampered database cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from iisan.core.errors import DataError

FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png")


class _LmdbImageRecord:
    """Inert stand-in for the authors' ``LMDB_Image``: data only, no methods run."""


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = frozenset({("copyreg", "_reconstructor"), ("builtins", "object")})

    def find_class(self, module, name):
        if name == "LMDB_Image":
            return _LmdbImageRecord
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an image LMDB")


def _safe_loads(data: bytes):
    return _SafeUnpickler(io.BytesIO(data)).load()


class ImageSource:
    """Looks up item images by ASIN (or item id) in a folder, a zip or an LMDB (read-only)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(
                self.path,
                "image folder/LMDB not found",
                "the paper's Amazon images are not redistributed here: the authors' repository (GAIR-Lab/IISAN "
                "on GitHub, Dataset/) links them and its build_lmdb.py builds the LMDB (am_is.lmdb for "
                "Scientific) from a folder of {ASIN}.jpg. Put the LMDB or the folder at this path, point "
                "`images` at it, or set `images: null` for text-only data",
            )
        self._zip = zipfile.ZipFile(self.path) if zipfile.is_zipfile(self.path) else None
        self._is_lmdb = self._zip is None and (self.path.is_file() or (self.path / "data.mdb").is_file())
        self._env = None
        if self._is_lmdb:
            self._lmdb()  # a file that is not an LMDB is refused here, before any work
        # a zip (MicroLens ships its covers as one): image entries by file stem, wherever they sit in it
        self._members = (
            {Path(n).stem: n for n in self._zip.namelist() if Path(n).suffix.lower() in FOLDER_SUFFIXES}
            if self._zip
            else None
        )

    @property
    def kind(self) -> str:
        return "zip" if self._zip else "lmdb" if self._is_lmdb else "folder"

    def _lmdb(self):
        if self._env is None:
            import lmdb

            try:
                self._env = lmdb.open(
                    str(self.path), subdir=self.path.is_dir(), readonly=True, lock=False, readahead=False
                )
            except lmdb.Error as e:
                raise DataError(
                    self.path,
                    f"not an image LMDB ({e.__class__.__name__}: {e})",
                    "point `images` at a folder of {ASIN}.jpg files or at the authors' LMDB (e.g. am_is.lmdb)",
                ) from None
        return self._env

    def locate(self, asin: str) -> str | None:
        """A key that ``load`` accepts, or None if the image is missing."""
        if self._members is not None:
            return self._members.get(asin)
        if self._is_lmdb:
            with self._lmdb().begin() as txn:  # keys are UTF-8 bytes (ASCII for Amazon ASINs)
                return asin if txn.get(asin.encode("utf-8")) is not None else None
        for suf in FOLDER_SUFFIXES:
            p = self.path / f"{asin}{suf}"
            if p.is_file():
                return p.name
        return None

    def read_bytes(self, key: str) -> bytes:
        """The stored bytes of an image (the file, the zip member, the LMDB record), undecoded."""
        if self._is_lmdb:
            with self._lmdb().begin() as txn:
                return bytes(txn.get(key.encode("utf-8")))
        if self._zip is not None:
            with self._zip.open(key) as f:
                return f.read()
        return (self.path / key).read_bytes()

    def check_header(self, key: str, raw: bytes) -> None:
        """A cheap validity check, no pixels decoded: the file must open as an image (an LMDB
        record must unpickle to the authors' record)."""
        try:
            if self._is_lmdb:
                _safe_loads(raw)
            else:
                with Image.open(io.BytesIO(raw)):
                    pass
        except Exception as e:  # any malformed file is the same user problem
            where = f"{self.path} (key {key})" if self._is_lmdb else self.path / key
            raise DataError(
                where,
                f"image cannot be decoded ({e.__class__.__name__})",
                "re-download or replace the file, or delete it and set `missing_images: blank`",
            ) from e

    def load(self, key: str) -> Image.Image:
        """RGB image for a key from ``locate``; DataError if it cannot be decoded."""
        if self._is_lmdb:
            with self._lmdb().begin() as txn:
                raw = txn.get(key.encode("utf-8"))
            where = f"{self.path} (key {key})"
            try:
                rec = _safe_loads(raw)
                h, w = rec.size
                arr = np.frombuffer(rec.image, dtype=np.uint8).reshape(h, w, rec.channels)
                return Image.fromarray(arr).convert("RGB")
            except Exception as e:  # any malformed record is the same user problem
                raise DataError(
                    where,
                    f"image record cannot be decoded ({e})",
                    "rebuild the LMDB entry, or delete it and set `missing_images: blank`",
                ) from e
        p = self.path / key
        try:
            if self._zip is not None:
                with self._zip.open(key) as f, Image.open(io.BytesIO(f.read())) as im:
                    return im.convert("RGB")
            with Image.open(p) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(
                p,
                f"image cannot be decoded ({e.__class__.__name__})",
                "re-download or replace the file, or delete it and set `missing_images: blank`",
            ) from e


def listing_fingerprint(path) -> str | None:
    """A cheap digest of an image folder's or LMDB's listing: each file's name, size and
    modification time (no decoding). The workflow passes it as a param of ``prepare``,
    so adding, replacing or removing images reruns preparation and what follows."""
    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    entries = [path] if path.is_file() else sorted(os.scandir(path), key=lambda e: e.name)
    for e in entries:
        st = e.stat()
        h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]
