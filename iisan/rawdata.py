"""Readers for the authors' raw Amazon format (also written by ``iisan synth``).

- items TSV: ``ASIN<TAB>title``, no header; titles hold HTML entities.
- users TSV: ``user<TAB>ASIN ASIN ...``, oldest first, no header.
"""

from __future__ import annotations

import html
from pathlib import Path

from iisan.errors import DataError


def _lines(path: Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found", f"check the `{what}` path in config.yaml")
    if path.stat().st_size == 0:
        raise DataError(path, f"{what} file is empty", f"point `{what}` at a non-empty {what} TSV")
    with path.open(encoding="utf-8", newline="") as f:
        for no, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if line.strip():
                yield no, line


def _fields(path, no, line, what, example):
    parts = line.split("\t")
    if len(parts) != 2:
        raise DataError(
            path,
            f"expected 2 tab-separated columns, found {len(parts)}",
            f"each {what} line must be `{example}` (one TAB, no header)",
            line=no,
        )
    return parts


def read_items(path) -> dict[str, str]:
    """ASIN -> title (HTML entities decoded), in file order."""
    items: dict[str, str] = {}
    for no, line in _lines(path, "items"):
        asin, title = _fields(path, no, line, "items", "ASIN<TAB>title")
        asin = asin.strip()
        if not asin:
            raise DataError(path, "empty ASIN", "give every item an ASIN in column 1", line=no)
        if asin in items:
            raise DataError(path, f"ASIN {asin!r} appears twice", "keep one line per ASIN", line=no)
        items[asin] = html.unescape(title).strip()
    return items


def read_users(path, known_items: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """[(user, [ASIN, ...])] oldest first. With ``known_items``, every ASIN must be in it."""
    users = []
    for no, line in _lines(path, "users"):
        user, seq = _fields(path, no, line, "users", "user<TAB>ASIN ASIN ...")
        asins = seq.split()
        if not asins:
            raise DataError(path, f"user {user!r} has no items", "drop the line or list the user's items", line=no)
        if known_items is not None:
            for a in asins:
                if a not in known_items:
                    raise DataError(
                        path,
                        f"user {user!r} names item {a!r}, which is not in the items file",
                        "add the item to the items TSV or remove it from the sequence",
                        line=no,
                    )
        users.append((user, asins))
    return users
