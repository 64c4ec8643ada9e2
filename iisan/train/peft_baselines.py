"""The embedded baselines (method.md section 6), in peft's shape: a config, the
layer, the wiring. FFT, LoRA, Adapter and BitFit adapt a BERT- and/or a
ViT-style encoder inside the loop; the item embedding is a Linear over the
concatenated CLS vectors of their last layers.

- ``PEFTConfig``: LoRA rank and alpha, the adapters' bottleneck (``peft:`` in
  the train settings); resolved into the model config, so metrics.json and the
  checkpoint record it.
- ``HoulsbyAdapter``: the one layer iisan defines (LoRA comes from ``peft``).
- ``EmbeddedItemEncoder`` and one subclass per method, each saying in
  ``adapt`` which parameters train.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from iisan.core.errors import ConfigError
from iisan.extract.item_inputs import EncodedItems
from iisan.train.model import ItemEncoder, ItemSources
from iisan.train.settings import ModelConfig, PEFTConfig

# --- the layer


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


# --- the wiring

# (recognise by a module name, LoRA targets, modules an adapter follows): first match wins
TARGETS = [
    (
        "attention.self.query",
        ["query", "value"],
        [r"layer\.\d+\.attention\.output\.dense$", r"layer\.\d+\.output\.dense$"],
    ),  # BERT, RoBERTa, MiniLM
    (
        "attention.q_proj",
        ["q_proj", "v_proj"],
        [r"layers\.\d+\.attention\.o_proj$", r"layers\.\d+\.mlp\.fc2$"],
    ),  # ViT (transformers 5 names)
    (
        "attention.attention.query",
        ["query", "value"],
        [r"layer\.\d+\.attention\.output\.dense$", r"layer\.\d+\.output\.dense$"],
    ),  # ViT (transformers 4 names)
]


def targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(LoRA target modules, patterns of the projections adapters follow) for a supported encoder."""
    names = [n for n, _ in model.named_modules()]
    for marker, lora, adapter in TARGETS:
        if any(marker in n for n in names):
            return lora, adapter
    raise ConfigError(
        f"embedded PEFT supports BERT- and ViT-style encoders only; {model.__class__.__name__} has none of "
        f"{[m for m, _, _ in TARGETS]}"
    )


class EmbeddedItemEncoder(ItemEncoder):
    """Backbone(s) adapted by ``adapt`` -> Linear(concat CLS of the last layers) -> d."""

    @classmethod
    def configure(cls, cfg: ModelConfig, sources: ItemSources) -> ModelConfig:
        return dataclasses.replace(super().configure(cfg, sources), peft=dataclasses.asdict(PEFTConfig(**cfg.peft)))

    def __init__(self, cfg: ModelConfig, sources: ItemSources):
        super().__init__(cfg, sources)
        pc = PEFTConfig(**self.cfg.peft)
        self._backbones = sources.backbones  # plain dict: the modules are registered below
        self.inputs = {m: EncodedItems(sources.data, b, texts=sources.texts.get(m))
                       for m, b in sources.backbones.items()}  # fmt: skip
        self.encoders = nn.ModuleDict()
        for m, b in sources.backbones.items():
            b.model = self.adapt(b.model, pc)
            b.model.train()
            self.encoders[m] = b.model
        self.head = nn.Linear(sum(b.info["hidden"] for b in sources.backbones.values()), cfg.d)

    @staticmethod
    def adapt(model: nn.Module, pc: PEFTConfig) -> nn.Module:
        """Make this method's parameters (and only those) trainable; returns the model to use."""
        raise NotImplementedError

    def forward(self, ids):  # (M,) -> (M, d)
        parts = []
        for m, b in self._backbones.items():
            last = [b.info["n_layers"]]
            pooled = b.forward(self.inputs[m](ids.tolist()), last, trainable=True)[:, 0]  # (M, H) CLS of the last layer
            parts.append(pooled.float().to(ids.device))
        return self.head(torch.cat(parts, dim=-1))


class FFTItemEncoder(EmbeddedItemEncoder):
    """Full fine-tuning: every weight trains."""

    @staticmethod
    def adapt(model, pc):
        targets(model)  # supported encoders only, like the others
        return model.requires_grad_(True)


class BitFitItemEncoder(EmbeddedItemEncoder):
    """BitFit: biases only."""

    @staticmethod
    def adapt(model, pc):
        targets(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
        return model


class LoRAItemEncoder(EmbeddedItemEncoder):
    """LoRA (``peft``) on query and value, wrapping the pretrained Linear layers;
    B starts at zero, so step 0 is the pretrained model."""

    @staticmethod
    def adapt(model, pc):
        from peft import LoraConfig, inject_adapter_in_model

        lora, _ = targets(model)
        model.requires_grad_(False)
        model = inject_adapter_in_model(
            LoraConfig(r=pc.lora_r, lora_alpha=pc.lora_alpha, lora_dropout=0.0, target_modules=lora), model
        )
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model


class AdapterItemEncoder(EmbeddedItemEncoder):
    """Houlsby adapters after the attention output and the FFN output of every layer."""

    @staticmethod
    def adapt(model, pc):
        _, after = targets(model)
        model.requires_grad_(False)
        for name, module in list(model.named_modules()):
            if any(re.search(pat, name) for pat in after) and isinstance(module, nn.Linear):
                parent, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, _WithAdapter(module, pc.adapter_bottleneck))
        return model
