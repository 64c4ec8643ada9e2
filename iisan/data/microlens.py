"""MicroLens-100K (westlake-repl/MicroLens) in its published layout, read into the
same records as the Amazon files, and a generated dataset in that layout.

- pairs: ``MicroLens-100k_pairs.tsv`` (``user<TAB>item item ...``, oldest first) or
  ``MicroLens-100k_pairs.csv`` (header ``user,item,timestamp``, milliseconds);
- titles: ``MicroLens-100k_title_en.csv``, no header, ``item_id,title`` split on the
  first comma (titles hold commas); an empty title is kept (counted, logged);
- covers: ``MicroLens-100k_covers.zip`` of ``{item_id}.jpg``, or its unpacked folder;
- frames (for video captions): a zip or folder of ``{item_id}/{k}.jpg`` or
  ``{item_id}_{k}.jpg``, e.g. ``MicroLens-100k_frames_interval_1_number_5.zip``.

Published counts (MicroLens-100K): 100,000 users, 19,738 items, 719,405 interactions.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from iisan.core.errors import DataError
from iisan.data.amazon import _lines, clean_text, read_users
from iisan.data.images import FOLDER_SUFFIXES, ImageSource

log = logging.getLogger(__name__)

PUBLISHED = {"n_users": 100_000, "n_items": 19_738, "n_interactions": 719_405}
FRAMES_PER_VIDEO = 3  # the paper captions three evenly spaced frames


def read_titles(path, encoding: str = "utf-8") -> dict[str, str]:
    """item id -> title, in file order."""
    titles: dict[str, str] = {}
    for no, line in _lines(path, "titles", encoding):
        item, comma, title = line.partition(",")
        item = item.strip()
        if not comma or not item.isdigit():
            raise DataError(path, f"expected `item_id,title`, found {line[:60]!r}",
                            "each line is a numeric item id, a comma, then the title (no header)", line=no)  # fmt: skip
        if item in titles:
            raise DataError(path, f"item {item} appears twice", "keep one line per item", line=no)
        titles[item] = clean_text(title.strip().strip('"'))
    empty = sum(1 for t in titles.values() if not t)
    if empty:
        log.warning("%s: %d of %d titles are empty; kept as empty text", path, empty, len(titles))
    return titles


def read_pairs(path, known_items: dict[str, str], encoding: str = "utf-8") -> list[tuple[str, list[str]]]:
    """[(user, [item id, ...])] oldest first, from the TSV or the CSV with timestamps."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return read_users(path, known_items, encoding)
    events: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    with path.open(encoding=encoding, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:3]] != ["user", "item", "timestamp"]:
            raise DataError(path, f"header {header!r} is not `user,item,timestamp`",
                            "give MicroLens-100k_pairs.csv as published, or the TSV", line=1)  # fmt: skip
        for no, row in enumerate(rows, start=2):
            if len(row) < 3 or not row[2].strip().lstrip("-").isdigit():
                raise DataError(path, f"expected `user,item,timestamp`, found {row!r}",
                                "each row is a user, an item id and a timestamp in milliseconds", line=no)  # fmt: skip
            user, item = row[0].strip(), row[1].strip()
            if item not in known_items:
                raise DataError(path, f"item {item!r} is not in the titles file",
                                "use the titles file of the same MicroLens release", line=no)  # fmt: skip
            events[user].append((int(row[2]), no, item))
    return [(u, [item for _, _, item in sorted(ev)]) for u, ev in events.items()]  # ties keep file order


class FrameSource:
    """Video frames per item id in a zip or folder; ``pick`` takes evenly spaced ones."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(self.path, "frames zip/folder not found", "set `frames:` to the unpacked or zipped frames")
        self._zip = zipfile.ZipFile(self.path) if zipfile.is_zipfile(self.path) else None
        names = (
            self._zip.namelist()
            if self._zip
            else [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        )
        self.frames: dict[str, list[str]] = defaultdict(list)
        for n in sorted(names, key=_natural):
            p = Path(n)
            if p.suffix.lower() not in FOLDER_SUFFIXES:
                continue
            item = p.parent.name if p.parent.name.isdigit() else p.stem.rsplit("_", 1)[0]
            self.frames[item].append(n)
        self._images = ImageSource(self.path)

    def pick(self, item: str, n: int = FRAMES_PER_VIDEO) -> list:
        """``n`` evenly spaced frames of an item's video (first and last included), or []."""
        names = self.frames.get(item, [])
        if not names:
            return []
        idx = np.linspace(0, len(names) - 1, n).round().astype(int)
        return [self._load(names[i]) for i in idx]

    def _load(self, name: str):
        return self._images.load(name)


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def synthesize_microlens(out, n_items: int = 300, n_users: int = 800, seed: int = 0, image_size: int = 32,
                         frames: int = 5) -> dict:  # fmt: skip
    """The generated demo (iisan.data.synth) written in MicroLens' layout: numeric item ids,
    titles CSV with commas (and every 25th title empty), pairs TSV and CSV, covers zip,
    frames zip of ``{id}/{k}.jpg`` whose pictures show the cover's colour trait."""
    from iisan.data.synth import COLOURS, draw_item_image, synthesize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".amazon-form-", dir=out))  # ours alone, removed at the end
    amazon = synthesize(work, n_items=n_items, n_users=n_users, seed=seed, image_size=image_size)
    truth = json.loads((work / "truth.json").read_text())
    asins = [line.split("\t", 1)[0] for line in Path(amazon["items"]).read_text(encoding="utf-8").splitlines()]
    ids = {a: str(i) for i, a in enumerate(asins, start=1)}
    rng = np.random.default_rng(seed + 1)
    with (out / "MicroLens-100k_title_en.csv").open("w", encoding="utf-8") as f:
        for line in Path(amazon["items"]).read_text(encoding="utf-8").splitlines():
            a, title = line.split("\t", 1)
            brand, rest = title.split(" ", 1)
            f.write(f"{ids[a]},{'' if int(ids[a]) % 25 == 0 else f'{brand}, {rest}'}\n")
    users = [line.split("\t") for line in Path(amazon["users"]).read_text(encoding="utf-8").splitlines()]
    with (out / "MicroLens-100k_pairs.tsv").open("w") as tsv, (out / "MicroLens-100k_pairs.csv").open("w") as csv_:
        csv_.write("user,item,timestamp\n")
        for u, (_, seq) in enumerate(users, start=1):
            items = [ids[a] for a in seq.split()]
            tsv.write(f"{u}\t{' '.join(items)}\n")
            t = 1_600_000_000_000 + int(rng.integers(0, 10**9))
            rows = [(u, it, t + 60_000 * k) for k, it in enumerate(items)]
            for r in rng.permutation(len(rows)):  # the CSV is not in time order
                csv_.write("{},{},{}\n".format(*rows[r]))
    with zipfile.ZipFile(out / "MicroLens-100k_covers.zip", "w") as z:
        for a in asins:
            z.write(Path(amazon["images"]) / f"{a}.jpg", f"MicroLens-100k_covers/{ids[a]}.jpg")
    with zipfile.ZipFile(out / "MicroLens-100k_frames.zip", "w") as z:
        for a in asins:
            colour = COLOURS[truth["items"][a]["colour"]]
            for k in range(frames):
                path = work / "frame.jpg"
                draw_item_image(rng, colour, image_size).save(path, quality=92)
                z.write(path, f"{ids[a]}/{k + 1}.jpg")
    shutil.rmtree(work)
    return {
        "items": str(out / "MicroLens-100k_title_en.csv"),
        "users": str(out / "MicroLens-100k_pairs.tsv"),
        "pairs_csv": str(out / "MicroLens-100k_pairs.csv"),
        "images": str(out / "MicroLens-100k_covers.zip"),
        "frames": str(out / "MicroLens-100k_frames.zip"),
    }
