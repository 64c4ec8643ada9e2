"""One writer per store. A writer registers in ``<store>.lock/`` (a file naming its host,
pid, start time and chunk range) for as long as it writes; a second writer whose range
overlaps a live one is refused with a message naming it, so no two processes ever write
the same chunk (shards of one store hold disjoint ranges and write side by side). The
check-and-register step runs under an ``fcntl`` lock the kernel drops with its holder. A
registration left by a dead process of this host is taken over, with a warning; one of
another host cannot be checked from here, so the message says how to clear it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from iisan.core.errors import IisanError

log = logging.getLogger(__name__)


class StoreLockedError(IisanError):
    """Raised when another live process writes the same chunks of a store."""


def lock_dir(store) -> Path:
    return Path(f"{store}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextlib.contextmanager
def holding(store, chunks: range, what: str = "extract"):
    """Hold the right to write ``chunks`` of ``store`` inside the block."""
    folder = lock_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    mine = folder / f"{host}-{pid}-{chunks.start}-{chunks.stop}.json"
    with open(folder / ".mutex", "a") as mutex:
        fcntl.lockf(mutex, fcntl.LOCK_EX)
        try:
            for other in sorted(folder.glob("*.json")):
                try:
                    held = json.loads(other.read_text())
                except (OSError, ValueError):
                    continue  # a registration being written or removed
                lo, hi = held["chunks"]
                if hi <= chunks.start or lo >= chunks.stop:
                    continue  # a disjoint range: a shard beside us
                if held["host"] == host and not _alive(held["pid"]):
                    log.warning("taking over the lock of %s: process %d (%s, started %s) is gone", store,
                                held["pid"], held["what"], held["started"])  # fmt: skip
                    other.unlink(missing_ok=True)
                    continue
                raise StoreLockedError(
                    f"{store} is being written by process {held['pid']} on {held['host']} ({held['what']}, chunks "
                    f"{lo}-{hi - 1}, since {held['started']})\n  fix: wait for it to finish; if no such process "
                    f"runs any more, remove {other} and run again"
                )
            mine.write_text(json.dumps({"host": host, "pid": pid, "chunks": [chunks.start, chunks.stop], "what": what,
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}))  # fmt: skip
        finally:
            fcntl.lockf(mutex, fcntl.LOCK_UN)
    try:
        yield
    finally:
        mine.unlink(missing_ok=True)
