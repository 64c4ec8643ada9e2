"""Stage one: ``iisan build-tiny``, ``caption``, ``extract``, ``cache-verify``, ``cache-info``."""

from __future__ import annotations

import json
import logging

from iisan.cli.common import json_arg

log = logging.getLogger("iisan")


def cmd_build_tiny(a):
    from iisan.extract.tiny import build_tiny

    build_tiny(a.kind, a.out, seed=a.seed)


def cmd_extract(a):
    from iisan.extract.cache import CHUNK_ITEMS
    from iisan.extract.extraction import extract, write_done
    from iisan.extract.specs import BackboneSpec

    spec = BackboneSpec.from_config(json_arg(a.backbone, "backbone"), "--backbone")
    layers = json_arg(a.layers, "layers") if a.layers else {}
    stats = extract(a.data, spec, layers, a.store, chunk_items=a.chunk_items or CHUNK_ITEMS, shard=a.shard,
                    nshards=a.nshards, on_mismatch=a.on_mismatch, init_only=a.init_only,
                    captions=a.captions)  # fmt: skip
    if a.done:
        write_done(a.store, a.done, stats, shard=a.shard, nshards=a.nshards, init_only=a.init_only)


def _backbone_spec(name_or_json: str, config_file: str):
    """A backbone spec: a key of config.yaml's ``backbones`` (pipeline-only keys dropped), or JSON."""
    from iisan.extract.specs import BackboneSpec

    if name_or_json.lstrip().startswith(("{", "@")):
        return BackboneSpec.from_config(json_arg(name_or_json, "backbone"), "backbone")
    import yaml

    from iisan.pipeline.config import validate
    from iisan.pipeline.workflow import Workflow

    with open(config_file, encoding="utf-8") as f:
        config = validate(yaml.safe_load(f))
    if name_or_json not in config["backbones"]:
        from iisan.core.errors import ConfigError

        raise ConfigError(f"backbone {name_or_json!r} is not in {config_file}; known: {sorted(config['backbones'])}")
    return BackboneSpec.from_config(json.loads(Workflow(config).backbone_json(name_or_json)), name_or_json)


def cmd_plan(a):
    from iisan.extract.backbones import plan as plan_backbone
    from iisan.extract.planner import parse_bytes

    spec = _backbone_spec(a.backbone, a.config)
    n_items = a.items
    if a.data:
        from iisan.data.prepared import PreparedData

        n_items = PreparedData.load(a.data).n_items
    plan = plan_backbone(spec, device=a.device, model_config=a.model_config, device_memory=a.device_memory,
                         chunk_items=a.chunk_items, n_items=n_items, tokens_per_item=a.tokens_per_item,
                         name=a.backbone)  # fmt: skip
    bandwidth = parse_bytes(a.bandwidth.removesuffix("/s"), "--bandwidth")
    flops = a.tflops * 1e12
    if a.json:
        print(json.dumps(plan.as_dict(bandwidth, flops), indent=2))
        return
    rows = plan.table(bandwidth, flops)
    width = max(len(k) for k, _ in rows)
    print(f"plan for {a.backbone} ({spec.model}) on {plan.device}:")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cmd_caption(a):
    from iisan.extract.caption import caption
    from iisan.extract.specs import CaptionSpec

    spec = CaptionSpec.from_config(json_arg(a.captioner, "captioner"), "--captioner")
    s = caption(a.data, spec, a.source, a.out, frames=a.frames, device=a.device)
    print(json.dumps({k: s[k] for k in ("n_items", "generated_now", "n_missing_pictures", "n_empty_captions")}))


def cmd_cache_verify(a):
    from iisan.extract.extraction import finish

    finish(a.store, a.done, shard_files=a.shards)
    log.info("cache %s complete", a.store)


def cmd_cache_info(a):
    from iisan.extract.cache import human_bytes, info

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


def add_commands(sub) -> None:
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
    s.add_argument("--chunk-items", type=int, help="items per Zarr chunk (default iisan.extract.cache.CHUNK_ITEMS)")
    s.add_argument("--shard", type=int, default=0)
    s.add_argument("--nshards", type=int, default=1)
    s.add_argument("--on-mismatch", choices=("error", "rebuild"), default="error")
    s.add_argument("--init-only", action="store_true", help="create the empty store and exit")
    s.add_argument("--captions", help="a folder from `iisan caption`: encode these captions instead of the titles")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("plan", help="what an offloaded backbone keeps on the device, streams, and will cost")
    s.add_argument("backbone", help="a key of config.yaml's `backbones`, or a backbone spec as JSON")
    s.add_argument("--config", default="config.yaml", help="the pipeline config naming the backbone")
    s.add_argument("--model-config", help="a folder with the model's config.json (default: the model, locally)")
    s.add_argument("--device", help="execution device (default: a GPU when max_memory names one, else cpu)")
    s.add_argument("--device-memory", help="the device's memory, e.g. 24GB (default: the GPU's, when present)")
    s.add_argument("--data", help="a prepared dataset: plan for its items")
    s.add_argument("--items", type=int, default=20_314, help="items to extract (default: Scientific's 20,314)")
    s.add_argument("--tokens-per-item", type=float, help="mean tokens per item (default: 2/3 of max_text_len)")
    s.add_argument("--chunk-items", type=int, default=1024, help="items per chunk (one streamed run each)")
    s.add_argument("--bandwidth", default="25GB/s", help="host-to-device bandwidth (PCIe 4.0 x16: ~25GB/s)")
    s.add_argument("--tflops", type=float, default=150.0, help="the device's fp16 TFLOP/s the forward reaches")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

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
