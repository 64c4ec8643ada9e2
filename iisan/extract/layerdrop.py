"""LayerDrop: which hidden states feed the SAN blocks (method.md section 3).

Indices returned here index ``hidden_states`` of a Hugging Face model: 0 is the
embedding output and i (1..L) is the output of transformer block i-1 (0-based).
The paper's table speaks in 0-based block indices, so hidden index = block + 1.

One rule serves both IISAN-VS and IISAN-VA: ``even`` keeps n block outputs with
the largest stride k such that the first one still exists, i.e.
``L - 1 - k*(n - 1) >= 0``, ending at the last block. For a 12-layer encoder and
n = 6 this is every second block (1,3,..,11 -> hidden 2,4,..,12); for an LLM
against a 12-layer image encoder n = 12/2 = 6 and it reproduces the authors'
runs: 32 -> 1,7,13,19,25,31; 28 -> 2,7,12,17,22,27; 80 -> 4,19,34,49,64,79;
24 -> 3,7,11,15,19,23. (Eq. 5 of the paper, ``L - k*L_img/2 >= 1``, gives
k = 13 for 80 layers, not the 15 the authors used; the rule above matches all
four published rows.)

Embedding output: the authors' code also taps hidden_states[0] (so VS has 7
blocks a tower). ``embedding: true`` (the default) prepends it, on both towers
alike, so the taps of a text and an image encoder still pair up one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from iisan.core.errors import ConfigError
from iisan.core.schema import setting

Scheme = Literal["even", "all", "explicit"]
Span = Literal["all", "top", "bottom"]
SCHEMES, SPANS = get_args(Scheme), get_args(Span)


@dataclass
class LayerSpec:
    """A layer selection by scheme (config.yaml's ``layers:`` as a mapping)."""

    scheme: Scheme = setting("even", "even: n taps, largest stride, ending at the last layer; all; explicit")
    n: int | None = setting(None, "number of block taps (even); default half the layers", minimum=1)
    span: Span = setting("all", "which half of the blocks to draw from")
    embedding: bool = setting(True, "also tap the embedding output, hidden_states[0]")
    indices: list = setting(
        factory=list, description="explicit hidden-state indices", items={"type": "integer", "minimum": 0}
    )


def even_blocks(n_blocks: int, n: int) -> list[int]:
    """n 0-based block indices, largest stride, ending at the last block."""
    if not 1 <= n <= n_blocks:
        raise ConfigError(f"layers.n={n} must be between 1 and the model's {n_blocks} layers")
    if n == 1:
        return [n_blocks - 1]
    k = (n_blocks - 1) // (n - 1)
    return [n_blocks - 1 - k * (n - 1 - j) for j in range(n)]


def normalize_spec(spec) -> dict:
    """A layer specification in one form: ``LayerSpec``'s fields, every key present.

    ``spec`` is an explicit list of hidden-state indices, or a mapping of ``LayerSpec``
    fields (``scheme``, ``n``, ``span``, ``embedding``, ``indices``)."""
    if isinstance(spec, (list, tuple)):
        spec = {"scheme": "explicit", "indices": list(spec)}
    spec = dict(spec or {})
    known = [f.name for f in fields(LayerSpec)]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ConfigError(f"layers: unknown key(s) {unknown}; known: {sorted(known)}")
    out = asdict(LayerSpec(**spec))
    out["indices"] = [int(i) for i in out["indices"]]
    if out["scheme"] not in SCHEMES:
        raise ConfigError(f"layers.scheme={out['scheme']!r} is not one of {SCHEMES}")
    if out["span"] not in SPANS:
        raise ConfigError(f"layers.span={out['span']!r} is not one of {SPANS}")
    return out


def select_layers(n_layers: int, spec) -> list[int]:
    """Hidden-state indices for a model with ``n_layers`` transformer blocks (see ``normalize_spec``)."""
    spec = normalize_spec(spec)
    if spec["scheme"] == "explicit":
        idx = spec["indices"]
        if not idx or any(not 0 <= i <= n_layers for i in idx) or len(set(idx)) != len(idx):
            raise ConfigError(f"layers.indices={idx} must be distinct hidden-state indices in 0..{n_layers}")
        return sorted(idx)
    half = n_layers // 2
    lo, hi = {"all": (0, n_layers), "top": (n_layers - half, n_layers), "bottom": (0, half)}[spec["span"]]
    if spec["scheme"] == "all":
        blocks = list(range(lo, hi))
    else:
        blocks = [lo + b for b in even_blocks(hi - lo, int(spec["n"] or max(1, (hi - lo) // 2)))]
    taps = [b + 1 for b in blocks]
    return ([0] if spec["embedding"] else []) + taps


def spec_tag(spec) -> str:
    """Filename-safe name of a layer *specification* (not of its indices), so cache
    paths are known before any model is downloaded: even6, even6-top, all, x0-2-4."""
    spec = normalize_spec(spec)
    if spec["scheme"] == "explicit":
        return "x" + "-".join(str(i) for i in spec["indices"])
    tag = "all" if spec["scheme"] == "all" else f"even{spec['n']}" if spec["n"] is not None else "evenhalf"
    if spec["span"] != "all":
        tag += f"-{spec['span']}"
    if not spec["embedding"]:
        tag += "-noemb"
    return tag
