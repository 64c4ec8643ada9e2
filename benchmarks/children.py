"""What the benchmarks share: each configuration measured in a process of its own (fresh
memory, its own threads), side by side in one run, and the real Scientific data prepared once.

A script calls ``answered(args, child)`` first (true in a child, which has then printed its
result) and ``in_child(__file__, job)`` for each configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCI = REPO.parent / "shared/data/amazon/scientific"  # the real Amazon Scientific files, beside the checkout


def in_child(script: str, job: dict, env: dict | None = None) -> dict:
    """``script --child JOB`` in a fresh interpreter: the JSON its last line prints."""
    r = subprocess.run([sys.executable, script, "--child", json.dumps(job)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})  # fmt: skip
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def answered(args, child) -> bool:
    """In a child (``--child JOB``): run ``child(job)``, print its JSON and say so."""
    if not getattr(args, "child", None):
        return False
    print(json.dumps(child(json.loads(args.child))))
    return True


def status_bytes(field: str) -> int:
    """A memory figure of this process from the kernel (``VmRSS:`` now, ``VmHWM:`` its peak), in bytes:
    exact where a sampled RSS could miss a short peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def scientific(folder: Path) -> Path:
    """The Scientific titles and users prepared under ``folder`` (once)."""
    from iisan.data.prepare import prepare

    if not (folder / "meta.json").is_file():
        prepare(SCI / "Industrial_and_Scientific_items.tsv", SCI / "am_Industrial_and_Scientific_users.tsv", folder)
    return folder
