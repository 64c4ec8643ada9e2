"""The two configs of a run, as nanoGPT keeps them: the model's shape, and how it
is optimised. Defaults are the authors' (method.md sections 4-5); the schema
(config.schema.yaml, ``$defs/train``) states the same keys with their limits,
and ``from_settings`` validates against it, so ``iisan train --settings`` and
config.yaml accept exactly the same things.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from iisan.errors import ConfigError, ConfigValidationError


@dataclass
class ModelConfig:
    """What a checkpoint must carry to rebuild the model.

    The first block is set by the user; the second is filled in when the model
    is built, from the data and what the item encoder reads (caches, backbones).
    """

    method: str = "iisan"  # a key of iisan.methods.METHODS
    d: int = 64  # embedding size of items and users
    bottleneck: int = 64  # SAN block hidden size
    intra: bool = True  # ablation: False = w/o intra towers
    inter: bool = True  # ablation: False = w/o inter tower
    learned_gates: bool = True  # ablation: False = gates fixed at 0.5
    blocks: int = 2  # sequence encoder blocks
    heads: int = 2  # sequence encoder heads
    dropout: float = 0.1
    peft: dict = field(default_factory=dict)  # embedded PEFT (iisan.peft_baselines.PEFTConfig), resolved at build

    # derived at build time, never settings
    n_items: int = 0  # catalogue size N (ids 1..N, 0 = padding)
    max_len: int = 0  # input sequence length
    text_taps: int = 0  # K_text: selected layers of the text input (0 = none)
    text_width: int = 0
    image_taps: int = 0
    image_width: int = 0

    DERIVED = ("n_items", "max_len", "text_taps", "text_width", "image_taps", "image_width")


@dataclass
class TrainConfig:
    """How the model is fitted and evaluated."""

    lr: float = 2e-4  # sequence encoder, heads, fusion
    lr_san: float = 1e-4  # SAN blocks
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 100
    patience: int = 10  # early stop after this many evaluations without a better valid HR@k
    eval_every: int = 1  # evaluate every this many epochs (and after the last)
    seed: int = 12345
    eval_batch_size: int = 2048
    device: str = "auto"
    metric_k: int = 10


def setting_names() -> tuple[set[str], set[str]]:
    """User-settable keys of ModelConfig and of TrainConfig."""
    model = {f.name for f in dataclasses.fields(ModelConfig)} - set(ModelConfig.DERIVED)
    return model, {f.name for f in dataclasses.fields(TrainConfig)}


def settings(mc: ModelConfig, tc: TrainConfig) -> dict:
    """The flat settings dict of a run (the inverse of ``from_settings``)."""
    model_keys, _ = setting_names()
    return {**{k: v for k, v in dataclasses.asdict(mc).items() if k in model_keys}, **dataclasses.asdict(tc)}


def from_settings(settings: dict, where: str = "--settings") -> tuple[ModelConfig, TrainConfig]:
    """One flat settings dict (config.yaml's ``train`` plus ``method``) -> the two configs.

    Validated against the schema first: unknown keys, wrong types and values
    out of range are a ConfigError naming the key."""
    from iisan.config import check_settings

    model_keys, train_keys = setting_names()
    unknown = sorted(set(settings) - model_keys - train_keys)
    if unknown:
        raise ConfigValidationError(
            f"{where}: unknown train setting(s) {unknown}; known: "
            f"{sorted(model_keys | train_keys)}\n  fix: correct the spelling or remove them"
        )
    s = check_settings(settings, where)
    return (
        ModelConfig(**{k: v for k, v in s.items() if k in model_keys}),
        TrainConfig(**{k: v for k, v in s.items() if k in train_keys}),
    )


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig saved with a checkpoint (derived fields included)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"checkpoint model config has unknown field(s) {unknown}; it was written by another iisan")
    return ModelConfig(**d)
