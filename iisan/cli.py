"""Command line: ``iisan <command>`` or ``python -m iisan <command>``.

Each command parses its arguments, calls the library and writes its outputs;
heavy imports happen inside the commands so ``iisan --version`` stays instant.
Any ``IisanError`` becomes a short message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from iisan import __version__
from iisan.errors import ConfigError, IisanError

log = logging.getLogger("iisan")


def _json_arg(text: str, what: str):
    """A JSON value given inline or as @file."""
    try:
        if text.startswith("@"):
            return json.loads(Path(text[1:]).read_text())
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--{what}: not valid JSON ({e}); give a JSON object inline or @path/to/file.json") from e


def _setup_logging(log_file: str | None, verbose: bool) -> None:
    """Log to stderr and, if given, append to ``log_file``: a rerun after a kill keeps the killed attempt's log."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        handlers=handlers,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("gptqmodel", "accelerate", "transformers", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_synth(a):
    from iisan.synth import synthesize

    if a.format == "microlens":
        from iisan.microlens import synthesize_microlens

        paths = synthesize_microlens(a.out, n_items=a.items, n_users=a.users, seed=a.seed, image_size=a.image_size)
    else:
        paths = synthesize(a.out, n_items=a.items, n_users=a.users, seed=a.seed, image_size=a.image_size, name=a.name)
    log.info("wrote demo raw data: %s", paths)


def cmd_prepare(a):
    from iisan.data import prepare

    meta = prepare(
        a.items,
        a.users,
        a.out,
        images=a.images,
        missing_images=a.missing_images,
        min_len=a.min_seq_len,
        max_seq_len=a.max_seq_len,
        encoding=a.encoding,
        format=a.format,
    )
    print(json.dumps({k: meta[k] for k in ("n_users", "n_items", "n_interactions", "missing_images")}))


def cmd_build_tiny(a):
    from iisan.tiny import build_tiny

    build_tiny(a.kind, a.out, seed=a.seed)


def cmd_extract(a):
    from iisan.backbones import BackboneSpec
    from iisan.cache import CHUNK_ITEMS
    from iisan.extract import extract, finish

    spec = BackboneSpec.from_config(_json_arg(a.backbone, "backbone"))
    layers = _json_arg(a.layers, "layers") if a.layers else {}
    stats = extract(
        a.data,
        spec,
        layers,
        a.store,
        chunk_items=a.chunk_items or CHUNK_ITEMS,
        shard=a.shard,
        nshards=a.nshards,
        on_mismatch=a.on_mismatch,
        init_only=a.init_only,
        captions=a.captions,
    )
    if a.done:
        if a.nshards == 1 and not a.init_only:
            finish(a.store, a.done, stats)
        else:  # a shard records only its own part; `cache-verify` writes the completion file
            Path(a.done).parent.mkdir(parents=True, exist_ok=True)
            Path(a.done).write_text(
                json.dumps({"store": str(a.store), "shard": a.shard, "nshards": a.nshards, "stats": stats}, indent=2)
            )


def cmd_caption(a):
    from iisan.caption import CaptionSpec, caption

    spec = CaptionSpec.from_config(_json_arg(a.captioner, "captioner"))
    s = caption(a.data, spec, a.source, a.out, frames=a.frames, device=a.device)
    print(json.dumps({k: s[k] for k in ("n_items", "generated_now", "n_missing_pictures", "n_empty_captions")}))


def cmd_cache_verify(a):
    from iisan.extract import finish

    shards = [json.loads(Path(f).read_text()).get("stats", {}) for f in a.shards]
    finish(a.store, a.done, {"shards": shards} if shards else None)
    log.info("cache %s complete", a.store)


def cmd_cache_info(a):
    from iisan.cache import human_bytes, info

    rows = [info(s) for s in a.stores]
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(
            f"{r['store']}\n  model     {r['model']}\n  shape     {tuple(r['shape'])} {r['dtype']}  "
            f"(layers {r['layers']})\n  on disk   {human_bytes(r['bytes_on_disk'])}\n"
            f"  all {r['all_layers']} layers would take {human_bytes(r['bytes_all_layers'])} "
            f"({r['bytes_all_layers'] / max(r['bytes_selected'], 1):.1f}x the selected layers)"
            + (f"\n  INCOMPLETE: {r['missing_chunks']} chunk(s) missing" if r["missing_chunks"] else "")
        )


def cmd_train(a):
    from iisan.train import train

    mc, tc = _settings(a)
    m = train(a.data, a.out, mc, tc, **_item_args(a), extra_meta={"experiment": a.name} if a.name else None)
    print(json.dumps({"valid": m["valid"], "test": m["test"], "best_epoch": m["best_epoch"]}))


def _item_args(a) -> dict:
    """--{text,image}-cache / -backbone / -layers -> the caches, backbones and layers a run reads."""
    from iisan.backbones import BackboneSpec

    return {
        "caches": _given(a, "cache"),
        "backbones": {
            m: BackboneSpec.from_config(_json_arg(v, f"{m}-backbone")) for m, v in _given(a, "backbone").items()
        },
        "layers": {m: _json_arg(v, f"{m}-layers") for m, v in _given(a, "layers").items()},
    }


def _given(a, kind: str) -> dict:
    """The --text-{kind} / --image-{kind} options given: modality -> value."""
    return {m: v for m in ("text", "image") if (v := getattr(a, f"{m}_{kind}"))}


def _settings(a):
    from iisan.settings import from_settings

    settings = _json_arg(a.settings, "settings") if a.settings else {}
    if not isinstance(settings, dict):
        raise ConfigError(f"--settings: expected a JSON object, got {type(settings).__name__}")
    return from_settings(settings)


def cmd_aggregate(a):
    from iisan.aggregate import aggregate

    runs = _json_arg(a.runs, "runs")
    m = aggregate(runs, a.out)
    print(json.dumps({"selected": m["selected_point"], "valid": m["valid"], "test": m["test"], "sd": m["sd"]}))


def cmd_profile(a):
    from iisan.outputs import atomic_json
    from iisan.profiling import profile

    mc, tc = _settings(a)
    result = profile(a.data, mc, tc, a.batch_size, a.steps, **_item_args(a))
    atomic_json(a.out, result)


def _run_args(a) -> dict:
    return {"data_dir": a.data, "caches": _given(a, "cache"), "device": a.device}


def cmd_recommend(a):
    from iisan.recommend import recommend, write_table

    frame = recommend(a.run, k=a.k, which=a.users, histories=a.histories, keep_history=a.keep_history,
                      **_run_args(a))  # fmt: skip
    for out in a.out:
        write_table(frame, out)
    log.info("top-%d for %d users -> %s", a.k, frame["user"].nunique(), ", ".join(a.out))


def cmd_embed(a):
    from iisan.recommend import export_embeddings

    written = export_embeddings(a.run, a.out, which=a.users, histories=a.histories, **_run_args(a))
    print(json.dumps(written))


def cmd_report(a):
    from iisan.report import build_profile_report, build_report

    experiments = _json_arg(a.experiments, "experiments") if a.experiments else None
    if a.profiles:
        labels = {e: d.get("label", e) for exps in (experiments or {}).values() for e, d in exps.items()}
        build_profile_report(_json_arg(a.profiles, "profiles"), a.out, labels)
    else:
        build_report(a.results, a.out, experiments=experiments)


def _add_item_args(s) -> None:
    for m in ("text", "image"):
        s.add_argument(f"--{m}-cache", help=f"{m} Zarr cache, for methods that read caches")
        s.add_argument(f"--{m}-backbone", help="backbone spec JSON, for methods that run backbones in the loop")
        s.add_argument(f"--{m}-layers", help="layer selection JSON, for uncached IISAN")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iisan", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"iisan {__version__}")
    p.add_argument("--log", help="also write the log to this file")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

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
    s.add_argument("--format", choices=("amazon", "microlens"), default="amazon", help="raw layout")
    s.add_argument("--missing-images", choices=("error", "blank"), default="error")
    s.add_argument("--min-seq-len", type=int, default=5)
    s.add_argument("--max-seq-len", type=int, default=10)
    s.add_argument("--encoding", default="utf-8", help="text encoding of the TSVs (a UTF-8 BOM is always accepted)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("build-tiny", help="build a tiny random backbone locally (tests and the demo)")
    s.add_argument("kind", help="tiny-bert, tiny-vit, tiny-llama, tiny-llama-gptq or tiny-llava")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_build_tiny)

    s = sub.add_parser("extract", help="run a frozen backbone and cache the selected layers (resumable)")
    s.add_argument("--data", required=True, help="prepared dataset folder")
    s.add_argument("--backbone", required=True, help="backbone spec as JSON (inline or @file)")
    s.add_argument("--layers", help='layer selection as JSON, e.g. \'{"scheme": "even", "n": 6}\' or \'[0, 2, 4]\'')
    s.add_argument("--store", required=True, help="Zarr store to create or resume")
    s.add_argument("--done", help="completion file to write when finished")
    s.add_argument("--chunk-items", type=int, help="items per Zarr chunk (default iisan.cache.CHUNK_ITEMS)")
    s.add_argument("--shard", type=int, default=0)
    s.add_argument("--nshards", type=int, default=1)
    s.add_argument("--on-mismatch", choices=("error", "rebuild"), default="error")
    s.add_argument("--init-only", action="store_true", help="create the empty store and exit")
    s.add_argument("--captions", help="a folder from `iisan caption`: encode these captions instead of the titles")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("caption", help="caption every item's cover or video frames with a vision-language model")
    s.add_argument("--data", required=True, help="prepared dataset folder")
    s.add_argument("--captioner", required=True, help='JSON: {"model": ..., "prompt": ..., "max_new_tokens": ...}')
    s.add_argument("--source", choices=("cover", "video"), required=True)
    s.add_argument("--frames", help="video frames: zip or folder of {item}/{k}.jpg (source video)")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True, help="output folder (captions.tsv, captions.json)")
    s.set_defaults(func=cmd_caption)

    s = sub.add_parser("cache-verify", help="check every chunk of a store is extracted; write the completion file")
    s.add_argument("--store", required=True)
    s.add_argument("--done", required=True)
    s.add_argument("shards", nargs="*", help="shard completion files whose extraction figures to keep")
    s.set_defaults(func=cmd_cache_verify)

    s = sub.add_parser("cache-info", help="shape, bytes on disk, and the cost of caching all layers")
    s.add_argument("stores", nargs="+")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_cache_info)

    s = sub.add_parser("train", help="train and evaluate from caches; writes metrics.json and friends")
    s.add_argument("--data", required=True)
    _add_item_args(s)
    s.add_argument("--settings", help="training settings as JSON (inline or @file)")
    s.add_argument("--name", help="experiment name recorded in metrics.json")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("aggregate", help="an experiment's runs (seeds x grid points) -> its metrics.json")
    s.add_argument(
        "--runs", required=True, help='JSON (inline or @file): [{"dir": run folder, "point": {...}, "seed": n}]'
    )
    s.add_argument("--out", required=True, help="the experiment folder")
    s.set_defaults(func=cmd_aggregate)

    s = sub.add_parser("profile", help="time and peak memory of training steps at one batch size (Figure 5)")
    s.add_argument("--data", required=True)
    _add_item_args(s)
    s.add_argument("--settings", help="training settings as JSON (inline or @file)")
    s.add_argument("--batch-size", type=int, required=True)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--out", required=True, help="JSON file to write")
    s.set_defaults(func=cmd_profile)

    use = {"recommend": "top-K items per user from a trained run (TSV and/or Parquet)",
           "embed": "item (and user) embeddings of a trained run, for a nearest-neighbour index"}  # fmt: skip
    for name, help_ in use.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("--run", required=True, help="a run folder (or an experiment folder: its selected run)")
        users = "test (as at test time), next (after each whole sequence), or a file of user ids"
        s.add_argument("--users", default="test" if name == "recommend" else None, help=users)
        s.add_argument("--histories", help="TSV of new users: name<TAB>ASIN ASIN ... (oldest first)")
        s.add_argument("--data", help="the prepared dataset (default: the one the run was trained on)")
        s.add_argument("--text-cache", help="the text cache, if it moved since training")
        s.add_argument("--image-cache", help="the image cache, if it moved since training")
        s.add_argument("--device", default="cpu")
        if name == "recommend":
            s.add_argument("--k", type=int, default=10)
            s.add_argument("--keep-history", action="store_true", help="also recommend items already in the history")
            s.add_argument("--out", nargs="+", required=True, help="*.tsv and/or *.parquet")
            s.set_defaults(func=cmd_recommend)
        else:
            s.add_argument("--out", required=True, help="folder for items.npy/.tsv (and users.npy/.tsv)")
            s.set_defaults(func=cmd_embed)

    s = sub.add_parser("report", help="collect metrics/efficiency into tables and plots")
    s.add_argument("--results", required=True, help="results/{dataset} folders' parent, e.g. results/")
    s.add_argument("--experiments", help="JSON: {dataset: {experiment: {group, label, ...}}} to order and label rows")
    s.add_argument("--profiles", help="JSON list of `iisan profile` outputs: a time-and-memory-by-batch-size report")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log_file = args.log or (
        str(Path(args.out) / "train.log") if args.command == "train" else None
    )  # every run keeps its log
    _setup_logging(log_file, args.verbose)
    log.info("==== iisan %s %s, attempt started (pid %d): %s", __version__, args.command, os.getpid(),
             " ".join(sys.argv[1:] if argv is None else argv))  # fmt: skip
    try:
        args.func(args)
    except IisanError as e:
        log.error("iisan %s: %s", args.command, e)
        return 2
    return 0
