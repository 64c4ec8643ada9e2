"""The item fields a tower may read: each item's title, its image, or a caption
generated from its cover or its video frames (``iisan caption``). One map serves
config validation, the workflow's paths, extraction and the cache's identity."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    modality: str  # the kind of backbone that reads it
    caption_source: str | None = None  # the pictures a caption is generated from (None: not a caption)


FIELDS = {
    "title": Field("text"),
    "image": Field("image"),
    "cover_caption": Field("text", "cover"),
    "video_caption": Field("text", "video"),
}
DEFAULT_FIELD = {"text": "title", "image": "image"}  # a tower's field unless it names one
CAPTION_FIELDS = {f.caption_source: name for name, f in FIELDS.items() if f.caption_source}  # source -> field
