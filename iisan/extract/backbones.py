"""Frozen backbones: loading through transformers Auto classes, and pooling.

Supported, by first match:
- image encoders (ViT-style, with their image processor): CLS of each layer;
- decoder LLMs (Llama, Mistral, Gemma, Mixtral, ...; fp or 4-bit GPTQ): mean over
  the real tokens of each layer, using the attention mask (never over padding);
- text encoders (BERT-style): CLS of each layer.

GPTQ checkpoints load through transformers' own GPTQ support (optimum +
gptqmodel; ``auto-gptq`` does not import with transformers 5). ``device_map``,
``max_memory`` and ``offload_folder`` pass straight to ``from_pretrained`` so a
70B model spreads over one GPU, CPU RAM and disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from iisan.core.device import input_device, resolve_device
from iisan.core.errors import ModelLoadError
from iisan.extract.specs import BackboneSpec

log = logging.getLogger(__name__)

# gptqmodel sizes a CPU thread pool from os.cpu_count(); on <= 3 cores its default
# (1 worker) is smaller than the 2 its model loader asks for and loading fails.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))

DECODER_TYPES = {
    "llama",
    "mistral",
    "mixtral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "qwen2",
    "qwen3",
    "phi",
    "phi3",
    "gpt2",
    "falcon",
    "opt",
}
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _config(spec: BackboneSpec):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.model, revision=spec.revision, local_files_only=spec.local_files_only)
    except OSError as e:
        raise ModelLoadError(
            f"backbone {spec.model!r} is not available locally ({e.__class__.__name__}).\n"
            f"  fix: on a machine with internet run `hf download {spec.model}` (it fills the hub cache, "
            f"~/.cache/huggingface), or set the backbone's `model:` to a local folder"
        ) from e


def model_info(spec: BackboneSpec) -> dict:
    """Layer count, width, pooling and quantisation from the config (no weights loaded),
    and a fingerprint of a local folder's files."""
    cfg = _config(spec)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    n_layers = getattr(text_cfg, "num_hidden_layers", None)
    hidden = getattr(text_cfg, "hidden_size", None)
    if n_layers is None or hidden is None:
        raise ModelLoadError(
            f"backbone {spec.model!r}: config has no num_hidden_layers/hidden_size; "
            "supported are BERT-, ViT- and decoder-LLM-style models"
        )
    is_decoder = cfg.model_type in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in (cfg.architectures or []))
    pooling = spec.pooling if spec.pooling != "auto" else ("mean" if is_decoder else "cls")
    quant = getattr(cfg, "quantization_config", None)
    quant_method = (
        (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None))
        if quant
        else None
    )
    return {
        "n_layers": int(n_layers),
        "hidden": int(hidden),
        "pooling": pooling,
        "model_type": cfg.model_type,
        "quantization": str(quant_method) if quant_method else None,
        "image_size": getattr(cfg, "image_size", None),
        "commit": getattr(cfg, "_commit_hash", None),  # the hub snapshot actually resolved (None for a plain folder)
        "weights": weights_fingerprint(spec.model) if Path(spec.model).is_dir() else None,
    }


# files of a local model folder that decide its outputs: weights, configs, tokenizer and processor files
MODEL_FILE_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".json", ".model",
                       ".txt", ".tiktoken"}  # fmt: skip
_SAMPLES, _BLOCK = 16, 1 << 16


def weights_fingerprint(folder) -> str:
    """A digest of a local model folder: each model file's name and size, and its
    content (whole for small files; for large ones the safetensors header, which
    lists every tensor's dtype, shape and offsets, and 16 evenly spaced 64 KiB
    blocks), so replacing the weights changes it while a 140 GB model costs a
    few milliseconds. Logs and iisan's own markers are left out."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or p.suffix not in MODEL_FILE_SUFFIXES or rel.parts[0] == "logs" or p.name.startswith("."):
            continue
        size = p.stat().st_size
        h.update(f"{rel.as_posix()}\0{size}\0".encode())
        with p.open("rb") as f:
            if size <= _SAMPLES * _BLOCK:
                h.update(f.read())
                continue
            if p.suffix == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 << 20)))
            for i in range(_SAMPLES):
                f.seek((size - _BLOCK) * i // (_SAMPLES - 1))
                h.update(f.read(_BLOCK))
    return h.hexdigest()[:16]


def processor_image_size(processor, fallback: int | None = 224) -> int | None:
    """Side length images are resized to by an image processor."""
    size = getattr(processor, "size", None) or {}
    return int(size.get("height") or size.get("shortest_edge") or fallback)


def load_processor(spec: BackboneSpec):
    """The tokenizer (text) or image processor (image) of a backbone."""
    from transformers import AutoImageProcessor, AutoTokenizer

    kw = dict(revision=spec.revision, local_files_only=spec.local_files_only)
    if spec.modality == "image":
        return AutoImageProcessor.from_pretrained(spec.model, **kw)
    tok = AutoTokenizer.from_pretrained(spec.model, **kw)
    if tok.pad_token is None:  # LLM tokenizers often have none; masked pooling makes the choice irrelevant
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"  # real tokens keep positions 0..n-1 in decoders too
    return tok


def resolve_dtype(spec: BackboneSpec, info: dict, device: torch.device) -> torch.dtype:
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    if info["quantization"] == "gptq":
        return torch.float16  # GPTQ kernels compute in fp16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # half precision matmuls are slow or missing on CPU


class Backbone:
    """A loaded, frozen backbone that maps a batch of item inputs to pooled
    hidden states of the selected layers: ``(B, K, H)``."""

    def __init__(self, spec: BackboneSpec, device: torch.device | None = None):
        from transformers import AutoModel

        self.spec = spec
        self.info = model_info(spec)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(spec, self.info, self.device)
        kw = dict(revision=spec.revision, local_files_only=spec.local_files_only, dtype=self.dtype)
        if spec.device_map is not None:
            kw.update(device_map=spec.device_map, max_memory=spec.max_memory, offload_folder=spec.offload_folder)
            if spec.offload_folder:
                Path(spec.offload_folder).mkdir(parents=True, exist_ok=True)
        elif self.info["quantization"]:
            kw.update(device_map=str(self.device))  # quantised weights must be placed at load time
        try:
            self.model = AutoModel.from_pretrained(spec.model, **kw)
        except (OSError, ImportError, ValueError) as e:
            hint = (
                " GPTQ checkpoints need `pip install optimum gptqmodel` (auto-gptq does not work with transformers 5)."
                if self.info["quantization"]
                else ""
            )
            raise ModelLoadError(f"cannot load backbone {spec.model!r}: {e}.{hint}") from e
        if spec.device_map is None and not self.info["quantization"]:
            self.model.to(self.device)
        self.model.eval().requires_grad_(False)
        self.input_device = input_device(self.model, self.device)
        self.processor = load_processor(spec)
        self._blocks = None

    def identity(self) -> dict:
        """What identifies this backbone's outputs (recorded by the runs that read it)."""
        return {
            "model": self.spec.model,
            "revision": self.spec.revision or self.info.get("commit"),
            "weights": self.info["weights"],
            "modality": self.spec.modality,
            "pooling": self.info["pooling"],
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @property
    def image_size(self) -> int | None:
        return processor_image_size(self.processor, self.info["image_size"]) if self.spec.modality == "image" else None

    def token_lengths(self, raw: list) -> list[int]:
        """Tokens each item occupies in a forward pass (titles: after truncation; images:
        the patch count plus CLS, the same for all), which is what padding costs."""
        if self.spec.modality == "text":
            enc = self.processor(list(raw), truncation=True, max_length=self.spec.max_text_len)
            return [len(ids) for ids in enc["input_ids"]]
        cfg = self.model.config
        side, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
        return [(side // patch) ** 2 + 1 if side and patch else 1] * len(raw)

    def streamed_bytes(self) -> int:
        """Bytes of weights accelerate moves in for every forward pass: modules kept on
        disk, and on CPU when the model computes on an accelerator."""
        hf_map = getattr(self.model, "hf_device_map", None) or {}
        on_accel = any(d not in ("cpu", "disk") for d in hf_map.values())
        total = 0
        for name, dev in hf_map.items():
            if dev == "disk" or (dev == "cpu" and on_accel):
                m = self.model.get_submodule(name)
                total += sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
        return total

    def encode_inputs(self, batch) -> dict:
        """Titles (list[str]) or PIL images -> model inputs on the input device (CPU work)."""
        if self.spec.modality == "text":
            enc = self.processor(
                list(batch), padding=True, truncation=True, max_length=self.spec.max_text_len, return_tensors="pt"
            )
        else:
            enc = self.processor(images=list(batch), return_tensors="pt")
        return dict(enc)

    def forward(self, inputs: dict, layers: list[int], grad: bool = False) -> torch.Tensor:
        """Pooled hidden states of ``layers`` -> (B, K, H), in the model's dtype, on its device.
        ``grad=True`` is for embedded fine-tuning (FFT, LoRA, adapters, BitFit)."""
        with torch.set_grad_enabled(grad):
            return self._forward(inputs, layers)

    def _inputs(self, inputs: dict) -> dict:
        inputs = {k: v.to(self.input_device, non_blocking=True) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if getattr(self.model.config, "use_cache", None) is not None:
            inputs["use_cache"] = False  # a decoder's key/value cache would keep every layer's K and V
        return inputs

    def _mean_weights(self, inputs: dict, device) -> torch.Tensor | None:
        """(B, T, 1) weights 1/n on real tokens, 0 on padding (mean pooling), or None (CLS)."""
        if self.info["pooling"] == "cls":
            return None
        mask = inputs["attention_mask"].to(device)
        return (mask / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(-1).to(self.dtype)

    @staticmethod
    def _pool(h: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return h[:, 0] if w is None else (h.to(w.device) * w).sum(1)

    def _forward(self, inputs: dict, layers: list[int]) -> torch.Tensor:
        """Each selected tap is pooled by a forward hook the moment its layer produces
        it, so only (B, K, H) is kept: activation memory does not grow with depth.
        The taps are transformers' ``hidden_states`` indices: 0 is the input of the
        first layer, i the output of layer i; the last is ``last_hidden_state``
        (after the final norm) for language models, as transformers ties it."""
        inputs = self._inputs(inputs)
        w = self._mean_weights(inputs, self.input_device)
        blocks, n = self._layer_modules(), self.info["n_layers"]
        tie_last = getattr(self.model.config, "tie_last_hidden_states", None)
        tie_last = self.spec.modality == "text" if tie_last is None else tie_last
        pooled: dict[int, torch.Tensor] = {}

        def tap(i):
            def hook(module, args, kwargs, output):
                if i == 0:
                    pooled[0] = self._pool(args[0] if args else kwargs["hidden_states"], w)
                if i + 1 in layers and not (tie_last and i + 1 == n):
                    pooled[i + 1] = self._pool(output[0] if isinstance(output, tuple) else output, w)

            return hook

        wanted = {0} if 0 in layers else set()
        wanted |= {i - 1 for i in layers if i > 0}
        handles = [blocks[i].register_forward_hook(tap(i), with_kwargs=True) for i in sorted(wanted)]
        try:
            out = self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        if tie_last and n in layers:
            pooled[n] = self._pool(out.last_hidden_state, w)
        return torch.stack([pooled[i].to(self.input_device) for i in layers], dim=1)

    def _layer_modules(self) -> torch.nn.ModuleList:
        """The model's stack of ``n_layers`` transformer blocks (whatever its attribute name)."""
        if self._blocks is None:
            n = self.info["n_layers"]
            stacks = [m for m in self.model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
            if not stacks:
                raise ModelLoadError(f"backbone {self.spec.model!r}: found no stack of {n} layers to tap")
            self._blocks = stacks[0]
        return self._blocks

    def forward_hidden_states(self, inputs: dict, layers: list[int]) -> torch.Tensor:
        """The same pooled taps through transformers' ``output_hidden_states`` (every
        layer's token states kept): the reference the hooks are tested against and the
        "before" of benchmarks/extract_batching.py."""
        with torch.no_grad():
            inputs = self._inputs(inputs)
            hs = self.model(**inputs, output_hidden_states=True).hidden_states
            if len(hs) != self.info["n_layers"] + 1:
                raise ModelLoadError(
                    f"backbone {self.spec.model!r} returned {len(hs)} hidden states, "
                    f"expected {self.info['n_layers'] + 1}"
                )
            w = self._mean_weights(inputs, self.input_device)
            return torch.stack([self._pool(hs[i], w).to(self.input_device) for i in layers], dim=1)
