"""Digests of whole files, each byte read, remembered: a file's SHA-256 is kept (in a small
SQLite table under ``$IISAN_CACHE_DIR``, default ``~/.cache/iisan``) by its path, size,
modification and change times and inode, so a 140 GB model is read once, and any write
to it (which moves its change time) has it read again."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from pathlib import Path

_BLOCK = 8 << 20


def memo_path() -> Path:
    return Path(os.environ.get("IISAN_CACHE_DIR") or Path.home() / ".cache" / "iisan") / "digests.sqlite"


@contextlib.contextmanager
def _memo():
    path = memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, stamp TEXT, digest TEXT)")
    except (OSError, sqlite3.Error):  # no writable cache folder: digests are computed every time
        db = None
    try:
        yield db
    finally:
        if db is not None:
            db.commit()
            db.close()


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def file_digest(path) -> str:
    """SHA-256 of every byte of ``path`` (hex), from the memo while the file is unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    with _memo() as db:
        if db is not None:
            row = db.execute("SELECT stamp, digest FROM digests WHERE path = ?", (str(path),)).fetchone()
            if row and row[0] == _stamp(st):
                return row[1]
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        digest = h.hexdigest()
        if db is not None and _stamp(path.stat()) == _stamp(st):  # not written to while we read it
            db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?)", (str(path), _stamp(st), digest))
    return digest
