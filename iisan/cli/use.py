"""Using a trained run: ``iisan recommend`` and ``iisan embed``."""

from __future__ import annotations

import json
import logging

from iisan.cli.common import given

log = logging.getLogger("iisan")


def _run_args(a) -> dict:
    return {"data_dir": a.data, "caches": given(a, "cache"), "device": a.device}


def cmd_recommend(a):
    from iisan.use.recommend import recommend, write_table

    frame = recommend(a.run, k=a.k, which=a.users, histories=a.histories, keep_history=a.keep_history,
                      **_run_args(a))  # fmt: skip
    for out in a.out:
        write_table(frame, out)
    log.info("top-%s for %d users -> %s", a.k or "k", frame["user"].nunique(), ", ".join(a.out))


def cmd_embed(a):
    from iisan.use.recommend import export_embeddings

    print(json.dumps(export_embeddings(a.run, a.out, which=a.users, histories=a.histories, index=a.index,
                                       **_run_args(a))))  # fmt: skip


def cmd_serve(a):
    from iisan.use.serve import serve

    serve(a.run, host=a.host, port=a.port, index=a.index, **_run_args(a))


def add_commands(sub) -> None:
    use = {"recommend": "top-K items per user from a trained run (TSV and/or Parquet)",
           "embed": "item (and user) embeddings of a trained run, for a nearest-neighbour index",
           "serve": "an HTTP endpoint answering top-K for known users and posted histories"}  # fmt: skip
    for name, help_ in use.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("--run", required=True, help="a run folder (or an experiment folder: its selected run)")
        if name != "serve":
            users = "test (as at test time), next (after each whole sequence), or a file of user ids"
            s.add_argument("--users", default="test" if name == "recommend" else None, help=users)
            s.add_argument("--histories", help="TSV of new users: name<TAB>ASIN ASIN ... (oldest first)")
        s.add_argument("--data", help="the prepared dataset (default: the one the run was trained on)")
        s.add_argument("--text-cache", help="the text cache, if it moved since training")
        s.add_argument("--image-cache", help="the image cache, if it moved since training")
        s.add_argument("--device", default="cpu")
        if name == "recommend":
            s.add_argument("--k", type=int, help="items per user (default: the run's metric_k)")
            s.add_argument("--keep-history", action="store_true", help="also recommend items already in the history")
            s.add_argument("--out", nargs="+", required=True, help="*.tsv and/or *.parquet")
            s.set_defaults(func=cmd_recommend)
        elif name == "embed":
            s.add_argument("--out", required=True, help="folder for items.npy/.tsv (and users.npy/.tsv)")
            s.add_argument("--index", choices=("faiss",), help="also write an ANN index (items.faiss) and its recall")
            s.set_defaults(func=cmd_embed)
        else:
            s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
            s.add_argument("--port", type=int, default=8000)
            s.add_argument("--index", help="an items.faiss from `iisan embed --index faiss` (default: exact top-K)")
            s.set_defaults(func=cmd_serve)
