"""Frozen backbones: loading through transformers Auto classes, and pooling.

Supported, by first match:
- image encoders (ViT-style, with their image processor): CLS of each layer;
- decoder LLMs (Llama, Mistral, Gemma, Mixtral, ...; fp or 4-bit GPTQ): mean over
  the real tokens of each layer, using the attention mask (never over padding);
- text encoders (BERT-style): CLS of each layer.

GPTQ checkpoints load through transformers' own GPTQ support (optimum +
gptqmodel; ``auto-gptq`` does not import with transformers 5), with the kernel
the spec's ``backend`` names. ``device_map: auto`` keeps on the execution device
what ``max_memory`` allows and streams the other layers through it, one layer at
a time for a whole chunk of items (``iisan.extract.planner`` places them,
``iisan.extract.streaming`` moves them), so a 70B model runs on one modest GPU
with the rest in host memory or on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch

from iisan.core.device import resolve_device
from iisan.core.digests import file_digest
from iisan.core.errors import ModelLoadError
from iisan.extract.planner import CUDA_CONTEXT_BYTES, Plan, budget, parse_bytes, place, sizes_from_config
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


# config.json of each of the paper's backbones (architectures only, no weights): `iisan plan` reads
# them for a backbone that is not on this machine
MODEL_CONFIGS = Path(__file__).parent / "model_configs"


def shipped_config(name: str) -> Path | None:
    """The shipped config folder of config.yaml's backbone ``name`` (instruction-tuned and chat
    variants share their base model's architecture), or None."""
    folder = MODEL_CONFIGS / name.removesuffix("-it").removesuffix("-chat")
    return folder if (folder / "config.json").is_file() else None


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
        "quant_bits": int((quant if isinstance(quant, dict) else quant.to_dict()).get("bits", 4)) if quant else None,
        "image_size": getattr(cfg, "image_size", None),
        "commit": getattr(cfg, "_commit_hash", None),  # the hub snapshot actually resolved (None for a plain folder)
        "weights": weights_fingerprint(spec.model) if Path(spec.model).is_dir() else None,
    }


# files of a local model folder that decide its outputs: weights, configs, tokenizer and processor files
MODEL_FILE_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".json", ".model",
                       ".txt", ".tiktoken"}  # fmt: skip


def weights_fingerprint(folder) -> str:
    """A digest of a local model folder: each model file's name, size and every byte of it
    (iisan.core.digests: read once, then remembered while the file is unchanged), so a
    change to any byte of any weight, config or tokenizer file changes it. Logs and
    iisan's own markers are left out."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or p.suffix not in MODEL_FILE_SUFFIXES or rel.parts[0] == "logs" or p.name.startswith("."):
            continue
        h.update(f"{rel.as_posix()}\0{p.stat().st_size}\0{file_digest(p)}\0".encode())
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


def plan(spec: BackboneSpec, *, device=None, model_config=None, device_memory=None, chunk_items: int = 1024,
         n_items: int = 20_314, tokens_per_item: float | None = None, name: str | None = None) -> Plan:  # fmt: skip
    """The plan of a backbone spec (``iisan.extract.specs.BackboneSpec``) from its config alone:
    ``model_config``, a folder with a ``config.json``; else the spec's model, locally; else the
    config shipped for config.yaml's backbone ``name`` (``MODEL_CONFIGS``)."""
    target = dataclasses.replace(spec, model=str(model_config)) if model_config else spec
    try:
        config = _config(target)
    except ModelLoadError:
        shipped = None if model_config or not name else shipped_config(name)
        if shipped is None:
            raise
        log.info("%s is not on this machine: planning from the config shipped with iisan, %s", spec.model, shipped)
        config = _config(dataclasses.replace(spec, model=str(shipped)))
    if device is None:  # where the weights are budgeted: a GPU index in max_memory means a GPU
        gpu = any(isinstance(k, int) for k in (spec.max_memory or {}))
        device = "cuda:0" if gpu else "cpu"
    device = torch.device(device)
    quant = getattr(config, "quantization_config", None)
    dtype = resolve_dtype(spec, {"quantization": "gptq" if quant else None}, device)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    fixed, layers, facts = sizes_from_config(config, dtype_bytes)
    device_budget, host_budget = budget(spec.max_memory, device)
    if device_memory is None and device.type == "cuda" and torch.cuda.is_available():
        device_memory = torch.cuda.get_device_properties(device).total_memory
    return Plan(place(fixed, layers, device_budget, host_budget), facts,
                None if device_memory is None else parse_bytes(device_memory, "--device-memory"), chunk_items,
                tokens_per_item or spec.max_text_len * 2 / 3, n_items, dtype_bytes,
                CUDA_CONTEXT_BYTES if device.type == "cuda" else 0, str(device))  # fmt: skip


class _Captured(Exception):
    """Stops a forward pass once the first layer's inputs are captured."""


def _quiet_gptqmodel() -> None:
    """gptqmodel prints through its own logger (logbar), which sets itself to INFO when first made: a
    banner, environment notices and a free-threading hint at every load, none about the user's run.
    Made here first, at ERROR, so gptqmodel's import finds it so; iisan logs what it loaded and how."""
    try:
        from logbar import LogBar
    except ImportError:  # no gptqmodel installed
        return
    LogBar.shared().setLevel(logging.ERROR)


class Backbone:
    """A loaded, frozen backbone that maps a batch of item inputs to pooled
    hidden states of the selected layers: ``(B, K, H)``.

    With ``device_map: auto`` the layers that ``max_memory`` leaves no room for
    stream (``self.stream``): ``forward_batches`` then runs several passes layer by
    layer, so each streamed layer crosses to the device once for all of them."""

    def __init__(self, spec: BackboneSpec, device: torch.device | None = None):
        self.spec = spec
        self.info = model_info(spec)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(spec, self.info, self.device)
        self.stream = None
        self._blocks = None
        self.model = self._load()
        self.model.eval().requires_grad_(False)
        if spec.device_map == "auto":
            self._place()
        elif not self.info["quantization"]:
            self.model.to(self.device)
        self.input_device = self.device
        self.processor = load_processor(spec)

    def _load(self):
        from transformers import AutoModel

        spec = self.spec
        kw = spec.pretrained_kwargs(self.dtype)
        # the GPTQ kernel: as given, else gptqmodel's choice; streaming needs one that keeps no state
        # derived from its weights (iisan.extract.streaming.STREAMABLE), and torch's is one
        backend = spec.backend or ("torch" if spec.device_map == "auto" else None)
        if self.info["quantization"] == "gptq":
            _quiet_gptqmodel()
        if self.info["quantization"] == "gptq" and backend and not spec.quantization_config:
            from transformers import GPTQConfig

            kw["quantization_config"] = GPTQConfig(bits=self.info["quant_bits"], backend=backend)
        if self.info["quantization"]:  # quantised weights are placed at load time: in host memory when streaming
            kw["device_map"] = {"": "cpu" if spec.device_map == "auto" else str(self.device)}
        try:
            with warnings.catch_warnings():
                # giving the kernel is how a loading attribute is set; transformers warns that the rest is ignored
                warnings.filterwarnings("ignore", "You passed `quantization_config`", UserWarning)
                return AutoModel.from_pretrained(spec.model, **kw)
        except (OSError, ImportError, ValueError) as e:
            hint = (" GPTQ checkpoints need `pip install optimum gptqmodel` (auto-gptq does not work with "
                    "transformers 5)." if self.info["quantization"] else "")  # fmt: skip
            raise ModelLoadError(f"cannot load backbone {spec.model!r}: {e}.{hint}") from e

    def _place(self) -> None:
        """Keep on the device what ``max_memory`` allows (iisan.extract.planner), home the rest."""
        from accelerate.utils import set_module_tensor_to_device

        from iisan.extract.streaming import LayerStream, nbytes, tensors

        blocks = self._layer_modules()
        layer_bytes = [nbytes(b) for b in blocks]
        device_budget, host_budget = budget(self.spec.max_memory, self.device)
        if device_budget is None and self.device.type == "cuda":  # no budget given: 80% of what is free now
            device_budget = int(0.8 * torch.cuda.mem_get_info(self.device)[0])
        self.placement = place(nbytes(self.model) - sum(layer_bytes), layer_bytes, device_budget, host_budget)
        if self.placement.homes:
            self.stream = LayerStream(blocks, self.placement.homes, self.device, self.spec.offload_folder,
                                      self.spec.backend)  # fmt: skip
        streamed = {id(t) for i in self.placement.homes for t in tensors(blocks[i]).values()}
        for name, t in tensors(self.model).items():
            if id(t) not in streamed and t.device != self.device:
                set_module_tensor_to_device(self.model, name, self.device)
        log.info("%s: %d of %d layers on %s, %d streamed (%s of weights per chunk of passes)", self.spec.model,
                 len(self.placement.resident), len(blocks), self.device, len(self.placement.homes),
                 f"{self.placement.streamed_bytes / 2**20:.1f} MiB")  # fmt: skip

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

    def encode_inputs(self, batch) -> dict:
        """Titles (list[str]) or PIL images -> model inputs on the input device (CPU work)."""
        if self.spec.modality == "text":
            enc = self.processor(
                list(batch), padding=True, truncation=True, max_length=self.spec.max_text_len, return_tensors="pt"
            )
        else:
            enc = self.processor(images=list(batch), return_tensors="pt")
        return dict(enc)

    def forward(self, inputs: dict, layers: list[int], trainable: bool = False) -> torch.Tensor:
        """Pooled hidden states of ``layers`` -> (B, K, H), in the model's dtype, on its device.
        Never builds a graph unless ``trainable`` (embedded fine-tuning: FFT, LoRA, adapters,
        BitFit) and gradients are on where it is called: evaluation under ``no_grad`` stays so."""
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()), self._eager():
            return self._streamed([inputs], layers)[0] if self.stream else self._forward(inputs, layers)

    def forward_batches(self, batches: list[dict], layers: list[int]) -> list[torch.Tensor]:
        """``forward`` of several passes. A streaming model runs them layer by layer, each streamed
        layer brought in once for all of them; the pooled taps are bit-identical to one pass each."""
        with torch.no_grad(), self._eager():
            return self._streamed(batches, layers) if self.stream else [self._forward(b, layers) for b in batches]

    def _eager(self):
        """gptqmodel compiles its dequantisation per module and guards on the weights' addresses, so it
        recompiles for every module (and every streamed load) until dynamo gives up: run it eagerly."""
        return torch.compiler.set_stance("force_eager") if self.info["quantization"] else contextlib.nullcontext()

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

    def _tie_last(self) -> bool:
        """Whether the last tap is ``last_hidden_state`` (after the final norm), as transformers ties it."""
        tie = getattr(self.model.config, "tie_last_hidden_states", None)
        return self.spec.modality == "text" if tie is None else tie

    def _forward(self, inputs: dict, layers: list[int]) -> torch.Tensor:
        """Each selected tap is pooled by a forward hook the moment its layer produces
        it, so only (B, K, H) is kept: activation memory does not grow with depth.
        The taps are transformers' ``hidden_states`` indices: 0 is the input of the
        first layer, i the output of layer i; the last is ``last_hidden_state``
        (after the final norm) for language models, as transformers ties it."""
        inputs = self._inputs(inputs)
        w = self._mean_weights(inputs, self.input_device)
        blocks, n, tie_last = self._layer_modules(), self.info["n_layers"], self._tie_last()
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

    def _first_layer_inputs(self, inputs: dict) -> tuple[torch.Tensor, tuple, dict]:
        """(hidden states, other args, kwargs) the model gives its first layer for ``inputs``
        (embeddings, attention mask, rotary positions), captured and the pass stopped there."""
        seen = {}

        def capture(module, args, kwargs):
            seen["args"], seen["kwargs"] = args, dict(kwargs)
            raise _Captured

        handle = self._layer_modules()[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.model(**inputs)
        except _Captured:
            pass
        finally:
            handle.remove()
        args, kwargs = seen["args"], seen["kwargs"]
        return (args[0], args[1:], kwargs) if args else (kwargs.pop("hidden_states"), (), kwargs)

    def _after_last_layer(self, inputs: dict, final: torch.Tensor) -> torch.Tensor:
        """``last_hidden_state`` for a last layer's output ``final``: the model's own forward with
        its layers short-circuited, so whatever follows them (the final norm) applies as usual."""
        blocks = self._layer_modules()

        def skip(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        for b in blocks[:-1]:
            b.forward = skip
        blocks[-1].forward = lambda *a, **k: final
        try:
            return self.model(**inputs).last_hidden_state
        finally:
            for b in blocks:
                del b.forward

    def _streamed(self, batches: list[dict], layers: list[int]) -> list[torch.Tensor]:
        """Every pass through layer i before any reaches layer i+1 (see ``forward_batches``)."""
        inputs = [self._inputs(b) for b in batches]
        weights = [self._mean_weights(x, self.input_device) for x in inputs]
        blocks, n, tie_last = self._layer_modules(), self.info["n_layers"], self._tie_last()
        firsts = [self._first_layer_inputs(x) for x in inputs]
        states = [h for h, _, _ in firsts]
        pooled = [{0: self._pool(h, w)} if 0 in layers else {} for h, w in zip(states, weights, strict=True)]
        tuple_out = False
        for i, block in enumerate(blocks):
            self.stream.load(i)
            try:
                for b, (_, args, kwargs) in enumerate(firsts):
                    out = block(states[b], *args, **kwargs)
                    tuple_out = isinstance(out, tuple)
                    states[b] = out[0] if tuple_out else out
                    if i + 1 in layers and not (tie_last and i + 1 == n):
                        pooled[b][i + 1] = self._pool(states[b], weights[b])
            finally:
                self.stream.release(i)
        if tie_last and n in layers:
            for b, x in enumerate(inputs):
                final = (states[b],) if tuple_out else states[b]
                pooled[b][n] = self._pool(self._after_last_layer(x, final), weights[b])
        return [torch.stack([p[i].to(self.input_device) for i in layers], dim=1) for p in pooled]

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
        "before" of benchmarks/extract_batching.py. A streaming model has every layer brought in for it."""
        streamed = list(self.stream.homes) if self.stream else []
        for i in streamed:
            self.stream.load(i)
        try:
            with torch.no_grad(), self._eager():
                return self._all_hidden_states(inputs, layers)
        finally:
            for i in streamed:
                self.stream.release(i)

    def _all_hidden_states(self, inputs: dict, layers: list[int]) -> torch.Tensor:
        inputs = self._inputs(inputs)
        hs = self.model(**inputs, output_hidden_states=True).hidden_states
        if len(hs) != self.info["n_layers"] + 1:
            raise ModelLoadError(
                f"backbone {self.spec.model!r} returned {len(hs)} hidden states, expected {self.info['n_layers'] + 1}"
            )
        w = self._mean_weights(inputs, self.input_device)
        return torch.stack([self._pool(hs[i], w).to(self.input_device) for i in layers], dim=1)
