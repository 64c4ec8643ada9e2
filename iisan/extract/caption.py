"""Captions from a frozen vision-language model: one per item, from its cover or
from three evenly spaced video frames (the paper's multimodal text, Table IX).

Models load through transformers' ``AutoProcessor`` and
``AutoModelForImageTextToText`` (LLaVA, LLaVA-NeXT, ...), with ``dtype``,
``device_map``/``max_memory``/``offload_folder`` and ``quantization_config``
passed through. Prompts go through the processor's chat template; generation is
batched with left padding and greedy, so a rerun reproduces every caption.

Work is resumable in chunks (``{out}.parts/chunk-NNNNN.tsv``, a kill loses at
most one chunk). The finished folder holds ``captions.tsv`` (``id, item,
caption``) and ``captions.json``: the model, its revision or weight fingerprint,
the prompt, the generation settings and the inputs captioned. Parts made under
other settings are discarded, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from iisan.core.device import input_device, resolve_device
from iisan.core.errors import ConfigError, DataError, ModelLoadError, OutputError
from iisan.core.outputs import MARKER, atomic_json, atomic_text, check_replaceable, output_folder
from iisan.core.provenance import code_hash
from iisan.data.amazon import clean_text
from iisan.data.fields import CAPTION_FIELDS
from iisan.data.images import listing_fingerprint
from iisan.data.prepared import PreparedData
from iisan.extract.backbones import DTYPES, weights_fingerprint
from iisan.extract.caption_table import captions_fingerprint
from iisan.extract.specs import CaptionSpec

log = logging.getLogger(__name__)

SOURCES = tuple(CAPTION_FIELDS)  # the pictures a caption is made from
# The paper (Section V-B) follows Open-Sora's captioning and adds in-context examples: prompts in
# the style of OpenAI's Sora for the videos, of DALL-E 2 for the covers. The examples below are
# written in those styles (not quoted); each prompt asks for one paragraph, content first.
VIDEO_EXAMPLES = (
    "A golden retriever runs along a wet beach at sunset, spraying water with each stride, while waves roll in "
    "behind it and the camera tracks it at ground level.",
    "In a small home kitchen, a woman in a green apron kneads dough on a floured wooden table, then shapes it "
    "into a round loaf; warm light comes from a window on the left.",
    "A street dancer in a red hoodie performs a fast routine on an empty city square at night, lit by shop "
    "signs, as a handheld camera circles him.",
)
COVER_EXAMPLES = (
    "A close-up photo of a smiling young man holding a steaming bowl of noodles, in a bright restaurant.",
    "A cartoon illustration of a cat wearing sunglasses, lying on a pink inflatable ring in a swimming pool.",
    "A screenshot of a mobile game with colourful candy pieces on a grid and a score bar at the top.",
)


def _with_examples(instruction: str, examples) -> str:
    return instruction + " Examples of the style wanted:\n" + "\n".join(f"- {e}" for e in examples)


PROMPTS = {
    "cover": _with_examples(
        "Describe this video cover in one sentence: the main subject, what it is doing, the setting and the "
        "style. Start with the subject and write no preamble.",
        COVER_EXAMPLES,
    ),
    "video": _with_examples(
        "These are three evenly spaced frames of a short video, in order. Describe the video in one paragraph "
        "of at most three sentences: what happens, who or what appears, the setting and how the camera moves. "
        "Start with the subject and write no preamble.",
        VIDEO_EXAMPLES,
    ),
}


def identity(data: PreparedData, spec: CaptionSpec, source: str, frames=None) -> dict:
    """What decides the captions: checked against parts on resume and recorded."""
    if source not in SOURCES:
        raise ConfigError(f"caption source {source!r} must be one of {SOURCES}")
    if source == "cover" and not data.has_images:
        raise DataError(data.root, "no cover images to caption", "set `images:` for this dataset")
    if source == "video" and not frames:
        raise DataError(data.root, "no video frames to caption", "set `frames:` for this dataset")
    local = Path(spec.model).is_dir()
    return {
        "model": spec.model,
        "revision": spec.revision,
        "weights": weights_fingerprint(spec.model) if local else None,
        "source": source,
        "prompt": spec.prompt or PROMPTS[source],
        "max_new_tokens": spec.max_new_tokens,
        "decoding": "greedy",
        "dtype": spec.dtype,
        "quantization_config": spec.quantization_config,
        "items_fingerprint": data.meta["text_fingerprint"],
        "inputs_fingerprint": data.meta["image_fingerprint"] if source == "cover" else listing_fingerprint(frames),
        "n_items": data.n_items,
        "chunk_items": spec.chunk_items,
        "code": code_hash("caption"),
    }


class Captioner:
    """A loaded, frozen vision-language model that captions lists of pictures."""

    def __init__(self, spec: CaptionSpec, device=None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.spec, self.device = spec, resolve_device(device)
        dtype = DTYPES[spec.dtype] or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        kw = spec.pretrained_kwargs(dtype)
        if spec.device_map is not None:  # generate() runs whole models: accelerate places and offloads them
            kw.update(device_map=spec.device_map, max_memory=spec.max_memory, offload_folder=spec.offload_folder)
        try:
            self.processor = AutoProcessor.from_pretrained(
                spec.model, revision=spec.revision, local_files_only=spec.local_files_only
            )
            self.model = AutoModelForImageTextToText.from_pretrained(spec.model, **kw)
        except (OSError, ValueError, ImportError) as e:
            raise ModelLoadError(
                f"cannot load captioning model {spec.model!r}: {e}\n"
                f"  fix: on a machine with internet run `hf download {spec.model}`, or point `model:` at a local folder"
            ) from e
        if spec.device_map is None and not spec.quantization_config:
            self.model.to(self.device)
        self.model.eval().requires_grad_(False)
        self.dtype = dtype
        self.input_device = input_device(self.model, self.device)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row at the right edge
        if self.processor.tokenizer.pad_token is None:
            self.processor.tokenizer.pad_token = self.processor.tokenizer.eos_token

    def prompt_text(self, n_images: int, prompt: str) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    @torch.no_grad()
    def __call__(self, pictures: list[list], prompt: str) -> list[str]:
        """One caption per entry of ``pictures`` (each a list of PIL images, same length)."""
        text = self.prompt_text(len(pictures[0]), prompt)
        enc = self.processor(
            images=[im for p in pictures for im in p], text=[text] * len(pictures), padding=True, return_tensors="pt"
        )
        enc = {k: v.to(self.input_device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        out = self.model.generate(**enc, max_new_tokens=self.spec.max_new_tokens, do_sample=False,
                                  pad_token_id=self.processor.tokenizer.pad_token_id)  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]
        return [clean_text(t).strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def _parts(out: Path, ident: dict) -> Path:
    """The resumable parts folder: kept if made under the same settings, else replaced."""
    parts = out.with_name(out.name + ".parts")
    if parts.exists():
        record = _own_parts(parts)
        if record.get("identity") == ident:
            return parts
        changed = sorted(k for k in ident if record.get("identity", {}).get(k) != ident[k])
        log.info("caption settings changed (%s): discarding %s", ", ".join(changed), parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    atomic_json(parts / MARKER, {"kind": "caption-parts", "identity": ident})
    return parts


def _own_parts(parts: Path) -> dict:
    """The marker of a parts folder iisan made and that holds only its chunk files;
    anything else is refused, so removing it can never take a user's files."""
    try:
        record = json.loads((parts / MARKER).read_text())
    except (OSError, ValueError):
        record = {}
    foreign = [p.name for p in parts.iterdir() if p.name != MARKER and not (p.is_file() and _CHUNK.fullmatch(p.name))]
    if record.get("kind") != "caption-parts" or foreign:
        raise OutputError(f"{parts} was not made by iisan or holds files it did not write ({foreign[:3]}); "
                          f"refusing to replace it\n  fix: move {parts} away yourself")  # fmt: skip
    return record


# chunk files, and what a kill mid-write of one (or of the marker) leaves: atomic_write's temporaries
_CHUNK = re.compile(r"chunk-\d{5}\.tsv|\.(chunk-\d{5}\.tsv|\.iisan-output\.json)\.[a-z0-9_]+\.tmp")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _part(parts: Path, c: int) -> str | None:
    """A finished part's captions (``id<TAB>caption`` lines), or None if it is missing or damaged
    (its last line is the checksum of the others; a damaged one is captioned again, logged)."""
    path = parts / f"chunk-{c:05d}.tsv"
    if not path.is_file():
        return None
    body, _, last = path.read_text("utf-8").rstrip("\n").rpartition("\n")
    body += "\n" if body else ""
    if last != f"#sha256\t{_sha256(body)}":
        log.warning("caption part %s is damaged (its checksum does not match): captioning it again", path)
        return None
    return body


def _has_pictures(data: PreparedData, source: str, frames, i: int) -> bool:
    return bool(data.image_keys[i] if source == "cover" else frames.frames.get(data.asins[i]))


def _pictures(data: PreparedData, source: str, frames, ids: list[int]) -> list[list | None]:
    """Each item's pictures: [cover] or 3 frames; None where the item has none."""
    images = data.image_source() if source == "cover" else None
    return [
        None if not _has_pictures(data, source, frames, i)
        else [images.load(data.image_keys[i])] if images else frames.pick(data.asins[i])
        for i in ids
    ]  # fmt: skip


def caption(data_dir, spec: CaptionSpec, source: str, out, *, frames=None, device=None) -> dict:
    """Caption every item of a prepared dataset into the folder ``out``. Returns the summary."""
    from iisan.data.microlens import FrameSource

    data = PreparedData.load(data_dir)
    ident = identity(data, spec, source, frames)
    out = Path(out).absolute()
    check_replaceable(out, "captions")  # before any work, not after hours of it
    parts = _parts(out, ident)
    frame_source = FrameSource(frames) if source == "video" else None
    n, size = data.n_items, spec.chunk_items
    chunks = [(c, range(1 + c * size, min(1 + (c + 1) * size, n + 1))) for c in range(-(-n // size))]
    todo = [(c, ids) for c, ids in chunks if _part(parts, c) is None]
    t0, model, generated = time.perf_counter(), None, 0
    with tqdm(total=sum(len(ids) for _, ids in todo), desc=f"caption {source}", unit="item", disable=None) as bar:
        for c, ids in todo:
            model = model or Captioner(spec, device)
            pics = _pictures(data, source, frame_source, list(ids))
            caps = [""] * len(ids)
            have = [j for j, p in enumerate(pics) if p is not None]
            for b in range(0, len(have), spec.batch_size):
                batch = have[b : b + spec.batch_size]
                for j, text in zip(batch, model([pics[j] for j in batch], ident["prompt"]), strict=True):
                    caps[j] = text
                generated += len(batch)
                bar.update(len(batch))
            bar.update(len(ids) - len(have))
            body = "".join(f"{i}\t{t}\n" for i, t in zip(ids, caps, strict=True))
            atomic_text(parts / f"chunk-{c:05d}.tsv", f"{body}#sha256\t{_sha256(body)}\n")
    texts = [""]
    for c, _ in chunks:
        texts += [line.split("\t", 1)[1] for line in _part(parts, c).splitlines()]
    missing = sum(not _has_pictures(data, source, frame_source, i) for i in range(1, n + 1))
    empty = sum(1 for t in texts[1:] if not t) - missing
    summary = {**ident, "n_missing_pictures": missing, "n_empty_captions": empty,
               "fingerprint": captions_fingerprint(ident, texts), "seconds_now": time.perf_counter() - t0,
               "generated_now": generated}  # fmt: skip
    if missing:
        log.warning("%d of %d items have no %s to caption: their caption is empty", missing, n, source)
    if empty:
        log.warning("%d of %d generated captions are empty (kept as empty text)", empty, n)
    table = "id\titem\tcaption\n" + "".join(f"{i}\t{data.asins[i]}\t{texts[i]}\n" for i in range(1, n + 1))
    summary["table_sha256"] = _sha256(table)  # read_captions checks the table is still what was written
    with output_folder(out, "captions", {"source": source}) as tmp:
        (tmp / "captions.tsv").write_text(table, encoding="utf-8")
        (tmp / "captions.json").write_text(json.dumps(summary, indent=2))
    _own_parts(parts)
    shutil.rmtree(parts)
    log.info("captioned %d items (%d now) from %s into %s", n, generated, source, out)
    return summary
