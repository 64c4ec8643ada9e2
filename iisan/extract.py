"""Stage one: run a frozen backbone over every item and cache the selected layers."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iisan import cache
from iisan.backbones import Backbone, BackboneSpec, load_processor, model_info, processor_image_size
from iisan.data import PreparedData
from iisan.errors import ConfigError, DataError
from iisan.item_inputs import ItemInputs
from iisan.layerdrop import select_layers
from iisan.provenance import code_hash

log = logging.getLogger(__name__)


def shard_chunks(n_chunks: int, shard: int, nshards: int) -> range:
    """Contiguous, chunk-aligned block of chunks for one shard job."""
    if not 0 <= shard < nshards:
        raise ConfigError(f"shard {shard} is outside 0..{nshards - 1}")
    per = -(-n_chunks // nshards)
    return range(shard * per, min((shard + 1) * per, n_chunks))


def cache_attrs(data: PreparedData, spec: BackboneSpec, layers_spec, chunk_items: int) -> dict:
    """What identifies a cache: checked against an existing store before any work."""
    info = model_info(spec)
    if spec.modality == "image" and not data.has_images:
        raise DataError(
            data.root,
            "dataset has no images but the backbone is an image encoder",
            "set `images:` for this dataset in config.yaml, or use a text backbone",
        )
    return {
        "model": spec.model,
        "revision": spec.revision or info.get("commit"),
        "weights": info["weights"],
        "modality": spec.modality,
        "n_layers": info["n_layers"],
        "layers": select_layers(info["n_layers"], layers_spec),
        "pooling": info["pooling"],
        "hidden": info["hidden"],
        "quantization": info["quantization"],
        "dtype": "float16",
        "max_text_len": spec.max_text_len if spec.modality == "text" else None,
        "image_size": processor_image_size(load_processor(spec)) if spec.modality == "image" else None,
        "input_fingerprint": data.meta["text_fingerprint" if spec.modality == "text" else "image_fingerprint"],
        "n_items": data.n_items,
        "chunk_items": chunk_items,
        "code": code_hash("extract"),
    }


def extract(
    data_dir,
    spec: BackboneSpec,
    layers_spec,
    store,
    *,
    chunk_items: int = cache.CHUNK_ITEMS,
    shard: int = 0,
    nshards: int = 1,
    on_mismatch: str = "error",
    device: torch.device | None = None,
    init_only: bool = False,
) -> dict:
    """Fill this shard's missing chunks of ``store``. Returns timing figures."""
    data = PreparedData.load(data_dir)
    attrs = cache_attrs(data, spec, layers_spec, chunk_items)
    writer = cache.CacheWriter(store, attrs, on_mismatch=on_mismatch)
    todo = [c for c in shard_chunks(writer.n_chunks, shard, nshards) if not writer.is_done(c)]
    stats = {
        "store": str(store),
        "chunks_total": writer.n_chunks,
        "chunks_done_now": 0,
        "items": 0,
        "seconds": 0.0,
        "forward_seconds": 0.0,
    }
    if init_only or not todo:
        return stats
    t_load = time.perf_counter()
    backbone = Backbone(spec, device)
    stats["load_seconds"] = time.perf_counter() - t_load
    make_inputs = ItemInputs(data, backbone)
    layers, bs = attrs["layers"], spec.batch_size
    cuda = backbone.input_device.type == "cuda"
    t0 = time.perf_counter()
    # the next batch's inputs are prepared in a thread while the model runs (torch releases the GIL)
    n_todo = sum(hi - max(lo, 1) for lo, hi in map(writer.chunk_rows, todo))  # real items; row 0 is padding
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        tqdm(total=n_todo, desc=f"extract {Path(spec.model).name}", unit="item", disable=None) as bar,
    ):
        for c in todo:
            lo, hi = writer.chunk_rows(c)
            rows = np.zeros((hi - lo, len(layers), attrs["hidden"]), dtype=np.float16)
            ids = list(range(max(lo, 1), hi))
            batches = [ids[i : i + bs] for i in range(0, len(ids), bs)]
            pending = pool.submit(make_inputs, batches[0]) if batches else None
            for j, b in enumerate(batches):
                inputs = pending.result()
                pending = pool.submit(make_inputs, batches[j + 1]) if j + 1 < len(batches) else None
                tf = time.perf_counter()
                pooled = backbone.forward(inputs, layers)
                if cuda:
                    torch.cuda.synchronize()
                stats["forward_seconds"] += time.perf_counter() - tf
                rows[b[0] - lo : b[-1] - lo + 1] = pooled.to("cpu", torch.float16).numpy()
                bar.update(len(b))
            writer.write_chunk(c, rows)
            stats["chunks_done_now"] += 1
            stats["items"] += len(ids)
    stats["seconds"] = time.perf_counter() - t0
    stats["items_per_s"] = stats["items"] / max(stats["seconds"], 1e-9)
    stats["outside_forward_share"] = 1 - stats["forward_seconds"] / max(stats["seconds"], 1e-9)
    log.info(
        "extracted %d items in %.1fs (%.0f items/s, %.1f%% outside the forward)",
        stats["items"],
        stats["seconds"],
        stats["items_per_s"],
        100 * stats["outside_forward_share"],
    )
    return stats


def finish(store, done_file, stats: dict | None = None) -> dict:
    """Verify every chunk is present and write the completion file Snakemake tracks."""
    attrs = cache.verify(store)
    summary = {"store": str(Path(store).resolve()), "attrs": attrs, "stats": stats or {}}
    Path(done_file).parent.mkdir(parents=True, exist_ok=True)
    Path(done_file).write_text(json.dumps(summary, indent=2))
    return summary
