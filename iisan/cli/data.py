"""``iisan synth`` and ``iisan prepare``: raw files and the prepared dataset."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("iisan")


def cmd_synth(a):
    if a.format == "microlens":
        from iisan.data.microlens import synthesize_microlens

        paths = synthesize_microlens(a.out, n_items=a.items, n_users=a.users, seed=a.seed, image_size=a.image_size)
    else:
        from iisan.data.synth import synthesize

        paths = synthesize(a.out, n_items=a.items, n_users=a.users, seed=a.seed, image_size=a.image_size, name=a.name)
    log.info("wrote demo raw data: %s", paths)


def cmd_prepare(a):
    from iisan.core.schema import fields
    from iisan.data.prepare import PrepareSettings, prepare

    settings = {f.name: getattr(a, f.name) for f in fields(PrepareSettings) if getattr(a, f.name) is not None}
    meta = prepare(a.items, a.users, a.out, images=a.images, **settings)
    print(json.dumps({k: meta[k] for k in ("n_users", "n_items", "n_interactions", "missing_images")}))


def add_commands(sub) -> None:
    s = sub.add_parser("synth", help="write the generated multimodal demo dataset in raw Amazon format")
    s.add_argument("--out", required=True)
    s.add_argument("--items", type=int, default=1000)
    s.add_argument("--users", type=int, default=3000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--name", default="demo", help="dataset name: files are {name}_items.tsv and am_{name}_users.tsv")
    s.add_argument("--format", choices=("amazon", "microlens"), default="amazon", help="raw layout to write")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("prepare", help="raw items/users TSV (+ images) -> prepared dataset")
    s.add_argument("--items", required=True, help="items TSV: ASIN<TAB>title (microlens: the titles CSV)")
    s.add_argument("--users", required=True, help="users TSV: user<TAB>ASIN ASIN ... (microlens: pairs TSV or CSV)")
    s.add_argument("--images", help="folder or zip of {ASIN}.jpg, or the authors' LMDB; omit for text-only data")
    # defaults and limits are iisan.data.prepare.PrepareSettings' (an omitted option takes its default)
    s.add_argument("--format", help="raw layout: amazon or microlens")
    s.add_argument("--missing-images", help="an item without an image: error, or a blank image")
    s.add_argument("--min-seq-len", type=int, help="drop users with fewer items")
    s.add_argument("--max-seq-len", type=int, help="model input length (the last max-seq-len + 3 items are kept)")
    s.add_argument("--encoding", help="text encoding of the raw files (a UTF-8 BOM is always accepted)")
    s.add_argument(
        "--truncate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep each user's last max-seq-len + 3 items (default), or (--no-truncate) every interaction",
    )
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_prepare)
