"""Readers for the authors' raw Amazon format (also written by ``iisan synth``).

- items TSV: ``ASIN<TAB>title``, no header; titles hold HTML entities.
- users TSV: ``user<TAB>ASIN ASIN ...``, oldest first, no header.

Files are read in ``encoding`` (UTF-8 by default; a byte-order mark is
accepted and dropped). Titles are cleaned so that whatever ``prepare`` writes
reads back: control characters and line/paragraph separators, raw or from
entities such as ``&#13;``, become spaces.
"""

from __future__ import annotations

import codecs
import html
import re
from pathlib import Path

from iisan.core.errors import DataError

# C0/C1 controls (tab, CR, LF included), and the Unicode line/paragraph separators
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ID = re.compile(r"\S+")


def clean_text(text: str) -> str:
    """One line of plain text: entities decoded, control characters -> spaces, runs of spaces kept."""
    return _UNSAFE.sub(" ", html.unescape(text)).strip()


def _encoding(encoding: str) -> str:
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(
            "encoding",
            f"unknown text encoding {encoding!r}",
            "give a Python codec name such as utf-8, latin-1 or cp1252",
        ) from None
    return "utf-8-sig" if name == "utf-8" else name  # a BOM is not part of the first ASIN


def _lines(path, what: str, encoding: str = "utf-8"):
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found", f"check the `{what}` path in config.yaml")
    if path.stat().st_size == 0:
        raise DataError(path, f"{what} file is empty", f"point `{what}` at a non-empty {what} TSV")
    enc = _encoding(encoding)
    with path.open("rb") as f:
        for no, raw in enumerate(f, start=1):
            try:
                line = raw.decode(enc if no == 1 else enc.replace("-sig", "")).rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(
                    path,
                    f"bytes {raw[max(e.start - 10, 0) : e.end + 10]!r} are not valid {encoding}",
                    "convert the file to UTF-8, or set the dataset's `encoding:` (e.g. latin-1)",
                    line=no,
                ) from None
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


def read_items(path, encoding: str = "utf-8") -> dict[str, str]:
    """ASIN -> title (HTML entities decoded, control characters removed), in file order."""
    items: dict[str, str] = {}
    lines: dict[str, int] = {}
    for no, line in _lines(path, "items", encoding):
        asin, title = _fields(path, no, line, "items", "ASIN<TAB>title")
        asin = asin.strip()
        if not asin:
            raise DataError(path, "empty ASIN", "give every item an ASIN in column 1", line=no)
        if not _ID.fullmatch(asin) or _UNSAFE.search(asin):
            raise DataError(
                path,
                f"ASIN {asin!r} contains whitespace or control characters",
                "an ASIN must be one word: it is written space-separated in the users file",
                line=no,
            )
        if asin in items:
            raise DataError(
                path, f"ASIN {asin!r} appears twice (first on line {lines[asin]})", "keep one line per ASIN", line=no
            )
        items[asin], lines[asin] = clean_text(title), no
    return items


def read_users(path, known_items: dict[str, str] | None = None, encoding: str = "utf-8") -> list[tuple[str, list[str]]]:
    """[(user, [ASIN, ...])] oldest first. With ``known_items``, every ASIN must be in it."""
    users = []
    lines: dict[str, int] = {}
    for no, line in _lines(path, "users", encoding):
        user, seq = _fields(path, no, line, "users", "user<TAB>ASIN ASIN ...")
        user = user.strip()
        if not user or _UNSAFE.search(user):
            raise DataError(
                path,
                f"user id {user!r} is empty or contains control characters",
                "give every user a printable id in column 1",
                line=no,
            )
        if user in lines:
            raise DataError(
                path,
                f"user {user!r} appears twice (lines {lines[user]} and {no})",
                "merge the two sequences into one line, or give the users distinct ids",
                line=no,
            )
        lines[user] = no
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
