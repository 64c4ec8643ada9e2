"""The captions table `iisan caption` writes: read back aligned with item ids, and
its fingerprint (what a cache of captions records as its input)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from iisan.core.errors import DataError
from iisan.data.prepared import PreparedData


def captions_fingerprint(ident: dict, texts: list[str]) -> str:
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
    for t in texts[1:]:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def read_captions(folder, data: PreparedData) -> tuple[list[str], dict]:
    """Captions aligned with item ids (index 0 empty) and the summary; refused if they
    were made for another item table."""
    folder = Path(folder)
    meta_path = folder / "captions.json"
    if not meta_path.is_file():
        raise DataError(folder, "not a captions folder (no captions.json)", "run `iisan caption` first")
    meta = json.loads(meta_path.read_text())
    if meta["items_fingerprint"] != data.meta["text_fingerprint"] or meta["n_items"] != data.n_items:
        raise DataError(folder, f"captions were made for another item table than {data.root}",
                        "re-run `iisan caption` on this prepared dataset")  # fmt: skip
    table = (folder / "captions.tsv").read_text(encoding="utf-8")
    if meta.get("table_sha256") != hashlib.sha256(table.encode("utf-8")).hexdigest():
        raise DataError(folder / "captions.tsv", "does not match the checksum captions.json records for it "
                        "(changed or damaged since `iisan caption` wrote it)",
                        f"run `iisan caption` again into {folder} (after moving this folder away)")  # fmt: skip
    texts = [""]
    for no, line in enumerate(table.splitlines()[1:], start=2):
        i, item, text = line.split("\t")
        if int(i) != len(texts) or item != data.asins[int(i)]:
            raise DataError(folder / "captions.tsv", f"row for item {item!r} is out of place",
                            "re-run `iisan caption`", line=no)  # fmt: skip
        texts.append(text)
    return texts, meta
