"""A generated multimodal demo dataset in the authors' raw Amazon format.

Each item has two hidden traits: a *kind* that only its title names and a
*colour* that only its image shows. Each user has a hidden taste for one
(kind, colour) pair and mostly buys items matching both. So a model that reads
titles alone narrows a user's next item to one kind (~1/8 of the catalogue),
images alone to one colour, and both together to ~1/64: multimodal beats either
modality, and every content model beats popularity. Deterministic from a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ["beaker", "pipette", "caliper", "multimeter", "microscope", "solder", "thermometer", "centrifuge"]
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 130, 30),
    "cyan": (40, 200, 210),
    "black": (30, 30, 30),
}
BRANDS = [
    "Acme",
    "Labtek",
    "Smith &amp; Sons",
    "Norda",
    "Vexo",
    "Kelvin",
    "Orbis",
    "Pyra",
    "Quanta",
    "Zell",
    "Hartley &amp; Co",
    "Medix",
    "Tessla",
    "Unimax",
    "Brightline",
    "Corvid",
]
MATERIALS = ["glass", "steel", "plastic", "aluminium", "ceramic", "silicone", "brass", "nylon"]
SIZES = ["mini", "compact", "standard", "large", "pro", "lab-grade", "portable", "heavy-duty"]
SHAPES = ["circle", "square", "triangle"]


def draw_item_image(rng: np.random.Generator, colour, size: int) -> Image.Image:
    # pale random background, one shape in the trait colour at a random place;
    # shape and background are distractors, the fill colour is the signal
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    shape = SHAPES[rng.integers(len(SHAPES))]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def synthesize(
    out,
    n_items: int = 1000,
    n_users: int = 3000,
    seed: int = 0,
    image_size: int = 32,
    p_match: float = 0.75,
    p_half: float = 0.15,
    name: str = "demo",
) -> dict:
    """Write ``{name}_items.tsv``, ``am_{name}_users.tsv``, ``images/{ASIN}.jpg`` and
    ``truth.json`` (the hidden traits) under ``out``. Returns the file paths."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    kind = rng.integers(len(KINDS), size=n_items)
    colour = rng.integers(len(colours), size=n_items)
    asins = [f"D{seed % 1000:03d}{i:06d}" for i in range(n_items)]
    # Zipf-like popularity, independent of traits
    weight = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.7

    items_path = out / f"{name}_items.tsv"
    with items_path.open("w", encoding="utf-8") as f:
        for i, a in enumerate(asins):
            title = (
                f"{BRANDS[rng.integers(len(BRANDS))]} {SIZES[rng.integers(len(SIZES))]} "
                f"{MATERIALS[rng.integers(len(MATERIALS))]} {KINDS[kind[i]]} model {rng.integers(100, 999)}"
            )
            f.write(f"{a}\t{title}\n")
            draw_item_image(rng, COLOURS[colours[colour[i]]], image_size).save(out / "images" / f"{a}.jpg", quality=92)

    users_path = out / f"am_{name}_users.tsv"
    with users_path.open("w", encoding="utf-8") as f:
        for u in range(n_users):
            k, c = rng.integers(len(KINDS)), rng.integers(len(colours))
            both = np.flatnonzero((kind == k) & (colour == c))
            half = np.flatnonzero((kind == k) ^ (colour == c))
            length = min(5 + rng.geometric(0.3) - 1, 13)
            seq: list[int] = []
            while len(seq) < length:
                r = rng.random()
                pool = both if r < p_match else half if r < p_match + p_half else np.arange(n_items)
                w = weight[pool] * ~np.isin(pool, seq)
                if w.sum() == 0:
                    continue
                seq.append(int(rng.choice(pool, p=w / w.sum())))
            f.write(f"U{u:05d}\t{' '.join(asins[i] for i in seq)}\n")

    truth = {
        "kinds": KINDS,
        "colours": colours,
        "seed": seed,
        "items": {a: {"kind": KINDS[kind[i]], "colour": colours[colour[i]]} for i, a in enumerate(asins)},
    }
    (out / "truth.json").write_text(json.dumps(truth))
    return {"items": str(items_path), "users": str(users_path), "images": str(out / "images")}
