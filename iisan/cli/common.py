"""What the command groups share: JSON arguments, logging, a run's inputs from flags."""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from pathlib import Path

from iisan.core.errors import ConfigError

MODALITIES = ("text", "image")


def json_arg(text: str, what: str):
    """A JSON value given inline or as @file."""
    try:
        if text.startswith("@"):
            return json.loads(Path(text[1:]).read_text())
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--{what}: not valid JSON ({e}); give a JSON object inline or @path/to/file.json") from e


# Third-party import noise that says nothing about the user's run, so a log holds iisan's lines and
# genuine warnings only. Each entry: the logger, and why its warnings are noise.
QUIET = {
    # gptqmodel imports torchao, which warns at import that its optional CUDA kernels (mxfp8,
    # cutlass) and triton are absent; iisan's GPTQ path (gptqmodel's torch kernel) uses none of them
    "torchao": "optional torchao kernels missing at import",
    # torchao registers enums with torch's pytree at import, which torch 2.13 flags as deprecated
    "torch.utils._pytree": "torchao's enum registration, deprecated at import",
}
# optimum's GPTQ loader (transformers loads GPTQ checkpoints through it) calls a deprecated transformers API
QUIET_WARNINGS = [("`is_gradient_checkpointing` is deprecated", FutureWarning)]


def setup_logging(log_file: str | None, verbose: bool) -> None:
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
    for name in QUIET:  # errors still come through
        logging.getLogger(name).setLevel(logging.ERROR)
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


def add_item_args(s) -> None:
    """--{text,image}-cache / -backbone / -layers / -captions: what a run's towers read."""
    for m in MODALITIES:
        s.add_argument(f"--{m}-cache", help=f"{m} Zarr cache, for methods that read caches")
        s.add_argument(f"--{m}-backbone", help="backbone spec JSON, for methods that run backbones in the loop")
        s.add_argument(f"--{m}-layers", help="layer selection JSON, for uncached IISAN")
        s.add_argument(
            f"--{m}-captions",
            help="a folder from `iisan caption`: the backbone reads these captions "
            "instead of the titles (methods that run backbones in the loop)",
        )


def given(a, kind: str) -> dict:
    """The --text-{kind} / --image-{kind} options given: modality -> value."""
    return {m: v for m in MODALITIES if (v := getattr(a, f"{m}_{kind}", None))}


def item_inputs(a):
    """The run's ``iisan.train.model.Inputs`` from the --{text,image}-* options."""
    from iisan.extract.specs import BackboneSpec
    from iisan.train.model import Inputs

    backbones = {m: BackboneSpec.from_config(json_arg(v, f"{m}-backbone"), f"--{m}-backbone")
                 for m, v in given(a, "backbone").items()}  # fmt: skip
    layers = {m: json_arg(v, f"{m}-layers") for m, v in given(a, "layers").items()}
    return Inputs.of(given(a, "cache"), backbones, layers, given(a, "captions"))


def train_settings(a):
    """(ModelConfig, TrainConfig) from --settings."""
    from iisan.train.settings import from_settings

    settings = json_arg(a.settings, "settings") if a.settings else {}
    if not isinstance(settings, dict):
        raise ConfigError(f"--settings: expected a JSON object, got {type(settings).__name__}")
    return from_settings(settings)
