"""Stage one: run a frozen backbone over every item and cache the selected layers."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iisan.core.errors import ConfigError, DataError, ExtractionError
from iisan.core.measure import PeakMemory
from iisan.core.provenance import code_hash
from iisan.data.fields import CAPTION_FIELDS, DEFAULT_FIELD
from iisan.data.prepared import PreparedData
from iisan.extract import cache
from iisan.extract.backbones import Backbone, load_processor, model_info, processor_image_size
from iisan.extract.batching import BatchSizer, is_out_of_memory
from iisan.extract.cache import human_bytes
from iisan.extract.caption_table import read_captions
from iisan.extract.item_inputs import ItemInputs
from iisan.extract.layerdrop import select_layers
from iisan.extract.lock import holding
from iisan.extract.specs import BackboneSpec

log = logging.getLogger(__name__)


def shard_chunks(n_chunks: int, shard: int, nshards: int) -> range:
    """Contiguous, chunk-aligned block of chunks for one shard job."""
    if not 0 <= shard < nshards:
        raise ConfigError(f"shard {shard} is outside 0..{nshards - 1}")
    per = -(-n_chunks // nshards)
    return range(shard * per, min((shard + 1) * per, n_chunks))


def cache_attrs(data: PreparedData, spec: BackboneSpec, layers_spec, chunk_items: int,
                captions: dict | None = None) -> dict:  # fmt: skip
    """What identifies a cache: checked against an existing store before any work.
    ``captions``: the summary of the captions read instead of titles (iisan.extract.caption)."""
    info = model_info(spec)
    if captions and spec.modality != "text":
        raise ConfigError(f"captions are text: backbone {spec.model!r} is an {spec.modality} encoder")
    field = CAPTION_FIELDS[captions["source"]] if captions else DEFAULT_FIELD[spec.modality]
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
        "field": field,
        "input_fingerprint": captions["fingerprint"] if captions else data.meta[f"{spec.modality}_fingerprint"],
        "data_fingerprint": data.meta["text_fingerprint"],
        "n_items": data.n_items,
        "chunk_items": chunk_items,
        "code": code_hash("extract"),
    }


@dataclass
class _Tally:
    """What the passes of one extraction did (its figures)."""

    passes: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_seconds: float = 0.0


def _passes(backbone: Backbone, sizer: BatchSizer, pool, raw: list, lengths: list[int], layers: list[int],
            tally: _Tally, bar) -> dict[int, torch.Tensor]:  # fmt: skip
    """Pooled taps of every item of a chunk, by position: batches sorted by length; a streaming
    backbone runs them all layer by layer, any other one pass after another with the next
    batch's inputs prepared in a thread meanwhile. An out-of-memory halves the batch size
    (``batch_size: auto``) and re-plans what is left."""
    done: dict[int, torch.Tensor] = {}
    while len(done) < len(raw):
        left = [p for p in range(len(raw)) if p not in done]
        batches = [[left[p] for p in b] for b in sizer.plan([lengths[p] for p in left])]
        running = {"batch": None}  # the pass being run, for the out-of-memory message and the halving
        try:
            if backbone.stream:  # one streamed run over the whole chunk: any of its passes may not fit
                running["batch"] = max(batches, key=len)
                t = time.perf_counter()
                inputs = [backbone.encode_inputs([raw[p] for p in b]) for b in batches]
                results = list(zip(batches, backbone.forward_batches(inputs, layers), strict=True))
                _synchronize(backbone.device)
                tally.forward_seconds += time.perf_counter() - t
            else:
                results = _pipelined(backbone, pool, raw, batches, layers, tally, running)
            for b, pooled in results:
                done.update(zip(b, pooled.to("cpu", torch.float16), strict=True))
                tally.passes += 1
                tally.real_tokens += sum(lengths[p] for p in b)
                tally.padded_tokens += len(b) * max(lengths[p] for p in b)
                bar.update(len(b))
            running["batch"] = None
        except RuntimeError as e:  # torch.OutOfMemoryError is one; cuBLAS's allocation failures are plain ones
            if not is_out_of_memory(e):
                raise
        if running["batch"] is not None:  # out of the except: the failed pass's tensors are free to go
            sizer.shrink(len(running["batch"]))  # raises unless `batch_size: auto`
    return done


def _pipelined(backbone: Backbone, pool, raw: list, batches: list[list[int]], layers: list[int], tally: _Tally,
               running: dict):  # fmt: skip
    """(batch, pooled) one pass after another, encoding the next batch in a thread meanwhile."""
    encode = backbone.encode_inputs
    pending = pool.submit(encode, [raw[p] for p in batches[0]])
    try:
        for j, b in enumerate(batches):
            inputs = pending.result()
            pending = pool.submit(encode, [raw[p] for p in batches[j + 1]]) if j + 1 < len(batches) else None
            running["batch"] = b
            t = time.perf_counter()
            pooled = backbone.forward(inputs, layers)
            _synchronize(backbone.device)
            tally.forward_seconds += time.perf_counter() - t
            yield b, pooled
    finally:
        if pending is not None:
            pending.cancel()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    captions=None,
) -> dict:
    """Fill this shard's missing chunks of ``store`` (``captions``: a folder from
    `iisan caption`, encoded instead of the titles). Returns timing figures."""
    data = PreparedData.load(data_dir)
    texts, caption_meta = read_captions(captions, data) if captions else (None, None)
    attrs = cache_attrs(data, spec, layers_spec, chunk_items, caption_meta)
    n = cache.n_chunks(attrs)
    mine = range(n) if nshards == 1 or init_only else shard_chunks(n, shard, nshards)
    with holding(store, mine, "extract" if not init_only else "create"):  # the only writer of these chunks
        if nshards > 1 and not init_only and not Path(store).exists():
            raise ConfigError(f"{store} does not exist yet: shards write a store `iisan extract --init-only` "
                              "creates\n  fix: run it first (the workflow's cache_init job does)")  # fmt: skip
        writer = cache.CacheWriter(store, attrs, on_mismatch=on_mismatch)
        stats = {"store": str(store), "chunks_total": writer.n_chunks, "chunks_done_now": 0, "items": 0,
                 "seconds": 0.0, "forward_seconds": 0.0}  # fmt: skip
        if init_only:
            return stats
        todo = _todo(writer, mine, stats)
        if todo:
            _extract_chunks(data, spec, texts, writer, todo, device, stats)
    return stats


def _todo(writer: cache.CacheWriter, mine: range, stats: dict) -> list[int]:
    """This job's chunks to extract: those not finished, and finished ones whose bytes are
    damaged since (checked against their checksums: a repair, logged)."""
    done = [c for c in mine if writer.is_done(c)]
    damaged = cache.CacheReader(writer.store, writer.attrs).check(done) if done else []
    for d in damaged:
        lo, hi = cache.chunk_items_range(writer.attrs, d.chunk)
        log.warning("%s: chunk %d (items %d-%d) is damaged (%s); extracting it again", writer.store, d.chunk, lo, hi,
                    d.problem)  # fmt: skip
        writer.undo(d.chunk)
    stats["chunks_repaired"] = len(damaged)
    return [c for c in mine if not writer.is_done(c)]


def _extract_chunks(data, spec: BackboneSpec, texts, writer: cache.CacheWriter, todo: list[int], device,
                    stats: dict) -> None:  # fmt: skip
    t_load = time.perf_counter()
    backbone = Backbone(spec, device)
    stats["load_seconds"] = time.perf_counter() - t_load
    layers, hidden = writer.attrs["layers"], writer.attrs["hidden"]
    make_inputs = ItemInputs(data, backbone, texts)
    sizer, tally = BatchSizer(spec, backbone.device), _Tally()
    moved0 = backbone.stream.moved_bytes if backbone.stream else 0
    t0 = time.perf_counter()
    n_todo = sum(hi - max(lo, 1) for lo, hi in map(writer.chunk_rows, todo))  # real items; row 0 is padding
    with (
        PeakMemory(backbone.device) as peak,
        ThreadPoolExecutor(max_workers=1) as pool,
        tqdm(total=n_todo, desc=f"extract {Path(spec.model).name}", unit="item", disable=None) as bar,
    ):
        baseline = peak.peak_bytes
        for c in todo:
            lo, hi = writer.chunk_rows(c)
            ids = list(range(max(lo, 1), hi))
            raw = make_inputs.raw(ids)
            pooled = _passes(backbone, sizer, pool, raw, backbone.token_lengths(raw), layers, tally, bar)
            rows = np.zeros((hi - lo, len(layers), hidden), dtype=np.float16)
            rows[[i - lo for i in ids]] = torch.stack([pooled[p] for p in range(len(ids))]).numpy()
            _finite(rows, lo, layers, spec, data)
            writer.write_chunk(c, rows)
            stats["chunks_done_now"] += 1
            stats["items"] += len(ids)
    make_inputs.close()
    stats["seconds"] = time.perf_counter() - t0
    moved = (backbone.stream.moved_bytes if backbone.stream else 0) - moved0
    _figures(stats, tally, sizer, peak, baseline, moved, backbone)


def _finite(rows: np.ndarray, lo: int, layers: list[int], spec: BackboneSpec, data) -> None:
    """Refuse pooled states that are not finite (a half-precision model overflowing, as Gemma can in
    fp16): stored, they would rank as nonsense rather than fail."""
    bad = ~np.isfinite(rows)
    if not bad.any():
        return
    items = sorted({lo + int(i) for i in np.flatnonzero(bad.any(axis=(1, 2)))})
    taps = [layers[int(k)] for k in np.flatnonzero(bad.any(axis=(0, 2)))]
    raise ExtractionError(
        f"backbone {spec.model!r} gave non-finite pooled states (dtype {spec.dtype}, stored as float16) for "
        f"{len(items)} item(s), ids {items[:10]} (e.g. {data.asins[items[0]]!r}), at hidden-state layer(s) {taps}",
        "set the backbone's `dtype: float32` (or bfloat16, whose range float16 lacks) and extract again",
    )


def _figures(stats: dict, tally: _Tally, sizer: BatchSizer, peak: PeakMemory, baseline: int, moved: int,
             backbone: Backbone) -> None:  # fmt: skip
    """The extraction's figures, into ``stats`` and the log."""
    items, cuda = max(stats["items"], 1), backbone.device.type == "cuda"
    stats.update(
        items_per_s=stats["items"] / max(stats["seconds"], 1e-9),
        forward_seconds=tally.forward_seconds,
        forward_share=tally.forward_seconds / max(stats["seconds"], 1e-9),
        real_tokens=tally.real_tokens,
        padded_tokens=tally.padded_tokens,
        padding_share=1 - tally.real_tokens / max(tally.padded_tokens, 1),
        passes=tally.passes,
        mean_batch_items=stats["items"] / max(tally.passes, 1),
        batch_size=sizer.max_items,
        tokens_per_batch=sizer.max_tokens,
        peak_memory_kind=peak.kind,
        peak_memory_bytes=peak.peak_bytes,
        peak_memory_above_baseline_bytes=peak.peak_bytes - (0 if cuda else baseline),
        layers_resident=len(backbone.placement.resident) if backbone.stream else backbone.info["n_layers"],
        layers_streamed=len(backbone.placement.homes) if backbone.stream else 0,
        streamed_weight_bytes=moved,  # counted as they moved (iisan.extract.streaming)
        streamed_weight_bytes_per_chunk=moved / max(stats["chunks_done_now"], 1),
        streamed_weight_bytes_per_pass=moved / max(tally.passes, 1),
        streamed_weight_bytes_per_item=moved / items,
    )
    stats["outside_forward_share"] = 1 - stats["forward_share"]
    log.info(
        "extracted %d items in %.1fs: %.0f items/s, forward %.0f%% of the time, padding %.1f%% of tokens, "
        "%d passes of up to %d items%s, peak %s %s above baseline%s",
        stats["items"], stats["seconds"], stats["items_per_s"], 100 * stats["forward_share"],
        100 * stats["padding_share"], tally.passes, sizer.max_items,
        f" / {sizer.max_tokens} tokens" if sizer.max_tokens else "", peak.kind,
        human_bytes(stats["peak_memory_above_baseline_bytes"]),
        f", {human_bytes(moved)} of weights streamed ({human_bytes(stats['streamed_weight_bytes_per_item'])} per item)"
        if moved else "",
    )  # fmt: skip


def finish(store, done_file, stats: dict | None = None, shard_files=()) -> dict:
    """Verify every chunk is present and write the completion file Snakemake tracks, with the
    extraction figures of this process (``stats``) or of the shards that wrote the store."""
    attrs = cache.verify(store)
    shards = [json.loads(Path(f).read_text()).get("stats", {}) for f in shard_files]
    summary = {
        "store": str(Path(store).resolve()),
        "attrs": attrs,
        "stats": {"shards": shards} if shards else stats or {},
    }
    Path(done_file).parent.mkdir(parents=True, exist_ok=True)
    Path(done_file).write_text(json.dumps(summary, indent=2))
    return summary


def write_done(store, done_file, stats: dict, *, shard: int = 0, nshards: int = 1, init_only: bool = False) -> None:
    """After ``extract``: the completion file of a whole store, or a shard's record of its own part
    (``cache-verify`` then verifies the store and writes its completion file)."""
    if nshards == 1 and not init_only:
        finish(store, done_file, stats)
        return
    Path(done_file).parent.mkdir(parents=True, exist_ok=True)
    record = {"store": str(store), "shard": shard, "nshards": nshards, "stats": stats}
    Path(done_file).write_text(json.dumps(record, indent=2))
