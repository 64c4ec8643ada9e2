"""Backbones inside the training loop: uncached IISAN and the embedded baselines.

- ``LiveFeatures``: the SANs' inputs computed by the frozen backbones at every
  step (forward only, no graph through them), rounded to the cache's float16 so
  uncached and cached IISAN are the same model.
- ``EmbeddedItemEncoder``: FFT, LoRA (r=8 on query and value, via ``peft``,
  wrapping the pretrained layers), BitFit (biases only) and Houlsby adapters
  (two per layer, bottleneck 64) on a text and/or an image encoder; the item
  embedding is a Linear over the concatenated CLS vectors (method.md section 6).

Both encode items with ``extract.ItemInputs`` (stage one's tokeniser / image
processor path) once, keep the model inputs in memory (``EncodedItems``), and
pool through ``Backbone.forward``. Decoding JPEGs and running an image
processor every step would otherwise cost more than the backbones.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from iisan.backbones import Backbone
from iisan.data import PreparedData
from iisan.errors import ConfigError
from iisan.extract import ItemInputs

EMBEDDED = ("fft", "lora", "adapter", "bitfit")

# (recognise by a module name, LoRA targets, modules an adapter follows): first match wins
PEFT_TARGETS = [
    ("attention.self.query", ["query", "value"],
     [r"layer\.\d+\.attention\.output\.dense$", r"layer\.\d+\.output\.dense$"]),  # BERT, RoBERTa, MiniLM
    ("attention.q_proj", ["q_proj", "v_proj"],
     [r"layers\.\d+\.attention\.o_proj$", r"layers\.\d+\.mlp\.fc2$"]),  # ViT (transformers 5 names)
    ("attention.attention.query", ["query", "value"],
     [r"layer\.\d+\.attention\.output\.dense$", r"layer\.\d+\.output\.dense$"]),  # ViT (transformers 4 names)
]


def _targets(model: nn.Module):
    names = [n for n, _ in model.named_modules()]
    for marker, lora, adapter in PEFT_TARGETS:
        if any(marker in n for n in names):
            return lora, adapter
    raise ConfigError(f"embedded PEFT supports BERT- and ViT-style encoders only; {model.__class__.__name__} has none of "
                      f"{[m for m, _, _ in PEFT_TARGETS]}")


class HoulsbyAdapter(nn.Module):
    """x + W_up act(W_down x) after a projection, before its residual; starts as the identity."""

    def __init__(self, width: int, bottleneck: int = 64):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        nn.init.normal_(self.down.weight, std=0.01)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(torch.nn.functional.gelu(self.down(x)))


class _WithAdapter(nn.Module):
    def __init__(self, proj: nn.Linear, bottleneck: int):
        super().__init__()
        self.proj, self.adapter = proj, HoulsbyAdapter(proj.out_features, bottleneck)

    def forward(self, x):
        return self.adapter(self.proj(x))


def apply_peft(model: nn.Module, method: str, lora_r: int = 8, adapter_bottleneck: int = 64) -> nn.Module:
    """Make ``method``'s parameters trainable (and only those); returns the model to use."""
    if method not in EMBEDDED:
        raise ConfigError(f"embedded method {method!r} is not one of {EMBEDDED}")
    lora_targets, adapter_after = _targets(model)
    model.requires_grad_(method == "fft")
    if method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    elif method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        # wraps the existing (pretrained) Linear layers; B starts at zero, so step 0 is the pretrained model
        model = inject_adapter_in_model(LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                   target_modules=lora_targets), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    elif method == "adapter":
        for name, module in list(model.named_modules()):
            if any(re.search(pat, name) for pat in adapter_after) and isinstance(module, nn.Linear):
                parent, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, _WithAdapter(module, adapter_bottleneck))
    return model


class EncodedItems:
    """Model inputs of every item, encoded once: token ids/masks right-padded to
    ``max_text_len`` (sliced per batch to its longest title), or pixel values."""

    def __init__(self, data: PreparedData, backbone: Backbone, chunk: int = 1024):
        make, n1 = ItemInputs(data, backbone), data.n_items + 1
        parts: dict[str, list] = {}
        for lo in range(0, n1, chunk):
            enc = make(list(range(lo, min(lo + chunk, n1))))
            for k, v in enc.items():
                if v.dim() == 2:  # (B, T) text: pad to a fixed width so chunks stack
                    v = torch.nn.functional.pad(v, (0, backbone.spec.max_text_len - v.shape[1]),
                                                value=0 if k != "input_ids" else backbone.processor.pad_token_id)
                parts.setdefault(k, []).append(v.half() if v.is_floating_point() else v)
        self.tensors = {k: torch.cat(v) for k, v in parts.items()}

    def __call__(self, ids: list[int]) -> dict:
        idx = torch.as_tensor(ids)
        out = {k: v[idx] for k, v in self.tensors.items()}
        if "attention_mask" in out:
            width = max(int(out["attention_mask"].sum(1).max()), 1)
            out = {k: v[:, :width] if v.dim() == 2 else v for k, v in out.items()}
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def load_backbones(specs: dict, device) -> dict[str, Backbone]:
    return {modality: Backbone(spec, device) for modality, spec in specs.items() if spec is not None}


class LiveFeatures:
    """Same interface as ``train.CachedFeatures``, computed by frozen backbones per step."""

    def __init__(self, data: PreparedData, backbones: dict[str, Backbone], layers: dict[str, list[int]]):
        self.backbones, self.layers = backbones, layers
        self.inputs = {m: EncodedItems(data, b) for m, b in backbones.items()}
        self.n_rows = data.n_items + 1
        self.attrs = {m: {"model": b.spec.model, "layers": layers[m], "mode": "uncached"} for m, b in backbones.items()}

    def _one(self, modality, ids):
        if modality not in self.backbones:
            return None
        b, real = self.backbones[modality], ids[ids != 0]
        h = torch.zeros(len(ids), len(self.layers[modality]), b.info["hidden"], device=ids.device)
        if len(real):
            pooled = b.forward(self.inputs[modality](real.tolist()), self.layers[modality])
            h[ids != 0] = pooled.to(ids.device).half().float()  # the cache's precision: same model as cached IISAN
        return h

    def __call__(self, ids):
        return self._one("text", ids), self._one("image", ids)

    def shape(self, name):
        if name not in self.backbones:
            return (0, 0)
        return (len(self.layers[name]), self.backbones[name].info["hidden"])


class EmbeddedItemEncoder(nn.Module):
    """Backbone(s) with embedded PEFT (or fully fine-tuned) -> Linear(concat CLS) -> d."""

    def __init__(self, data: PreparedData, backbones: dict[str, Backbone], method: str, d: int):
        super().__init__()
        self.method = method
        self._backbones = backbones  # plain dict: the modules are registered below
        self.inputs = {m: EncodedItems(data, b) for m, b in backbones.items()}
        self.encoders = nn.ModuleDict()
        for m, b in backbones.items():
            b.model = apply_peft(b.model, method)
            b.model.train()
            self.encoders[m] = b.model
        self.head = nn.Linear(sum(b.info["hidden"] for b in backbones.values()), d)

    def san_parameters(self):
        return []

    def forward(self, ids):  # (M,) -> (M, d)
        parts = []
        for m, b in self._backbones.items():
            last = [b.info["n_layers"]]
            pooled = b.forward(self.inputs[m](ids.tolist()), last, grad=True)[:, 0]  # (M, H) CLS of the last layer
            parts.append(pooled.float().to(ids.device))
        return self.head(torch.cat(parts, dim=-1))

    def gate_values(self) -> dict:
        return {}
