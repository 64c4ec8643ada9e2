"""The configs of a run, as nanoGPT keeps them: the model's shape (``ModelConfig``,
with the embedded baselines' ``PEFTConfig``), and how it is optimised and evaluated
(``TrainConfig``). Defaults are the authors' (method.md sections 4-5). Each setting
is stated here once, with its limits; config.yaml's schema (``train``) and
``iisan train --settings`` are both derived from these classes, so they accept
exactly the same things.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from iisan.core.errors import ConfigError, ConfigValidationError
from iisan.core.schema import check, fields, schema_of, setting
from iisan.train.methods import METHODS


@dataclass
class PEFTConfig:
    """Embedded PEFT settings (FFT, LoRA, Adapter, BitFit); defaults are the paper's."""

    lora_r: int = setting(8, "LoRA rank, on query and value", minimum=1)
    lora_alpha: float = setting(16, "LoRA scaling numerator (scale = alpha / r)", exclusiveMinimum=0)
    adapter_bottleneck: int = setting(64, "Houlsby adapter hidden size, two adapters per layer", minimum=1)


@dataclass
class ModelConfig:
    """What a checkpoint must carry to rebuild the model.

    The settings come first; the fields after them are derived when the model is
    built (from the data and what the item encoder reads), never set by a user.
    """

    method: str = setting("iisan", "a method of the registry (iisan/train/methods.py)", enum=list(METHODS))
    d: int = setting(64, "embedding size of items and users", minimum=2)
    bottleneck: int = setting(64, "SAN block hidden size", minimum=1)
    intra: bool = setting(True, "ablation: false = w/o intra towers")
    inter: bool = setting(True, "ablation: false = w/o inter tower")
    learned_gates: bool = setting(True, "ablation: false = every gate fixed at 0.5")
    allow_unequal_taps: bool = setting(
        False,
        "let the towers tap unequal numbers of layers (Table VIII's 24+12, 12+6): the inter tower pairs "
        "the top taps; without it unequal counts are refused, as the paper's runs pair them one to one",
    )
    blocks: int = setting(2, "sequence encoder blocks", minimum=1)
    heads: int = setting(2, "attention heads of the sequence encoder (must divide d)", minimum=1)
    dropout: float = setting(0.1, "sequence encoder dropout", minimum=0, exclusiveMaximum=1)
    peft: dict = setting(factory=dict, description="embedded PEFT baselines", schema=schema_of(PEFTConfig))

    # derived at build time
    n_items: int = 0  # catalogue size N (ids 1..N, 0 = padding)
    max_len: int = 0  # input sequence length
    text_taps: int = 0  # K_text: selected layers of the text input (0 = none)
    text_width: int = 0
    image_taps: int = 0
    image_width: int = 0

    def __post_init__(self):
        if self.d % self.heads:
            raise ConfigError(f"`d`={self.d} must be divisible by `heads`={self.heads}")


@dataclass
class TrainConfig:
    """How the model is fitted and evaluated."""

    lr: float = setting(2e-4, "learning rate: sequence encoder, heads, fusion", exclusiveMinimum=0)
    lr_san: float = setting(1e-4, "learning rate of the SAN blocks", exclusiveMinimum=0)
    weight_decay: float = setting(0.0, "Adam weight decay", minimum=0)
    batch_size: int = setting(64, "users per step (>= 2: the loss's negatives come from the other users)", minimum=2)
    epochs: int = setting(100, "at most this many epochs", minimum=1, maximum=100000)
    patience: int = setting(10, "early stop after this many evaluations without a better valid metric", minimum=1)
    eval_every: int = setting(1, "evaluate on valid every this many epochs (and at the last)", minimum=1)
    seed: int = setting(12345, "seeds parameters, data order and dropout", minimum=0)
    eval_batch_size: int = setting(2048, "users (and items) per evaluation batch", minimum=1)
    device: str = setting("auto", "auto: cuda if available, else cpu", pattern="^(auto|cpu|cuda(:[0-9]+)?|mps)$")
    residency: Literal["auto", "device", "host", "disk"] = setting(
        "auto",
        "where cached features reside while training: device, host (memory) or disk (read in place); "
        "auto picks by size and free memory (iisan.train.features)",
    )
    metric_k: int = setting(10, "cut-off of HR@k / NDCG@k (early stopping, reports, recommend's default k)",
                            minimum=1)  # fmt: skip
    keep_top: int = setting(50, "test users' top-K lists kept in topk.npz: the report's list metrics (coverage, "
                            "popularity) at k up to this", minimum=1, maximum=1000)  # fmt: skip


SETTINGS = (ModelConfig, TrainConfig)


def schema() -> dict:
    """The schema of a flat settings mapping (config.yaml's ``train`` plus ``method``)."""
    s = schema_of(TrainConfig)
    s["properties"] = {**schema_of(ModelConfig)["properties"], **s["properties"]}
    s["description"] = "training settings: the model's shape (ModelConfig) and its optimisation (TrainConfig)"
    return s


def settings(mc: ModelConfig, tc: TrainConfig) -> dict:
    """The flat settings dict of a run (the inverse of ``from_settings``)."""
    return {f.name: getattr(c, f.name) for c in (mc, tc) for f in fields(type(c))}


def from_settings(value: dict, where: str = "--settings") -> tuple[ModelConfig, TrainConfig]:
    """One flat settings dict (config.yaml's ``train`` plus ``method``) -> the two configs,
    validated against ``schema()``: unknown keys, wrong types and values out of range are
    a ConfigError naming the key."""
    known = schema()["properties"]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigValidationError(f"{where}: unknown train setting(s) {unknown}; known: {sorted(known)}\n"
                                    "  fix: correct the spelling or remove them")  # fmt: skip
    s = check(schema(), value, where)
    try:
        return tuple(cls(**{f.name: s[f.name] for f in fields(cls)}) for cls in SETTINGS)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig saved with a checkpoint (derived fields included)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"checkpoint model config has unknown field(s) {unknown}; it was written by another iisan")
    return ModelConfig(**d)
