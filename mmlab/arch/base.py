"""The adapter interface: what mmlab needs to know about one family of architectures.

An adapter wraps one Hugging Face model and answers, *its* way, every question the
engine, the weight swap and the harnesses ask of a model:

    encode(sample)              -> Inputs (token ids with image placeholders expanded, pixels)
    image_features(inputs)      -> one (n_i, d) tensor of projected visual tokens per image
    image_grid(inputs)          -> (rows, cols) of one image's tokens, or None
    positions(inputs)           -> RoPE positions of the prompt: (1, L), or (3, 1, L) for M-RoPE
    assemble(inputs, feats, kept) -> Prompt (inputs_embeds, positions, source, modality)
    decoder / lm_head / logits  -> the decoder stack and the head
    rotary(hidden, positions, layer) and attention_mask(layer, past, q) -> how layer i is called
    attention_logits(layer, hidden, pe, keys, rows) -> its pre-softmax scores, recomputed beside
                                   SDPA with q_norm / softcapping / sliding windows where it has them
    weighted_layer(...)         -> x + attn(x) + w * mlp(...) (p-MoD's routed-token update)
    calibration(n, length, data) -> calibration inputs for the weight quantizers

Adapters are found through a registry keyed by the config's ``model_type`` (the pattern
transformers uses for its own auto classes); nothing outside ``mmlab/arch/`` branches on an
architecture. Adding one = a file here with a registered subclass, a tiny random model in
``mmlab.testing`` and its rows in the ground-truth tests.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mmlab.methods.base import MethodError

_ADAPTERS: dict[str, type["Adapter"]] = {}


def register(cls: type["Adapter"]) -> type["Adapter"]:
    """Class decorator: serve ``cls.model_types`` (and the explicit name ``cls.name``) with ``cls``."""
    for key in (cls.name, *cls.model_types):
        if key in _ADAPTERS and _ADAPTERS[key] is not cls:
            raise ValueError(f"adapter key {key!r} registered twice ({_ADAPTERS[key].__name__}, {cls.__name__})")
        _ADAPTERS[key] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted({t for cls in _ADAPTERS.values() for t in cls.model_types})


def adapter_class(model_type: str, name: str | None = None) -> type["Adapter"]:
    """The adapter registered for ``name`` (an explicit adapter name) or else ``model_type``."""
    key = name or model_type
    if key not in _ADAPTERS:
        raise MethodError(f"no mmlab adapter for model_type {key!r}; supported: {', '.join(supported_model_types())} "
                          f"(adding one: CONTRIBUTING.md, 'An architecture')")
    return _ADAPTERS[key]


@dataclass
class VisionStates:
    """One image in the vision tower's feature layer, before the projector (``Adapter.vision_states``)."""

    states: torch.Tensor  # (1 + patches, d_vision): the [CLS] token first, then the patches in grid order
    cls_attention: torch.Tensor  # (patches,): the [CLS] query's attention in that layer, summed over heads
    keys: torch.Tensor  # (1 + patches, head_dim): that layer's keys, mean over heads


@dataclass
class Inputs:
    """One encoded sample, as the stock ``model(...)`` would take it."""

    input_ids: torch.Tensor  # (1, L) with every image's placeholder tokens expanded
    pixel_values: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # image_sizes / image_grid_thw / ...
    images: list = field(default_factory=list)  # PIL images, for drawing
    # tokens [0, context_len) are prefilled (methods act there); the rest, the question, is fed
    # after the prefill's methods (e.g. KV compression of a long context before the query arrives)
    context_len: int | None = None
    max_new_tokens: int | None = None  # the sample's own answer length limit (else the model's)

    def to(self, device, dtype: torch.dtype) -> "Inputs":
        """On the model's device, floating-point pixels in the model's dtype (ids stay integers)."""
        def move(t):
            if not isinstance(t, torch.Tensor):
                return t
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        return dataclasses.replace(self, input_ids=move(self.input_ids), pixel_values=move(self.pixel_values),
                                   extra={k: move(v) for k, v in self.extra.items()})

    def model_kwargs(self) -> dict:
        """What the stock ``model(...)`` / ``generate(...)`` takes besides ``input_ids``."""
        kw = dict(self.extra)
        if self.pixel_values is not None:
            kw["pixel_values"] = self.pixel_values
        return kw


@dataclass
class Prompt:
    """The assembled prompt the first decoder layer sees (image features already in place)."""

    embeds: torch.Tensor  # (1, n, d)
    positions: torch.Tensor  # (1, n), or (3, 1, n) for M-RoPE
    source: torch.Tensor  # (n,) index of each token in the full prompt (before image-feature methods)
    modality: torch.Tensor  # (L,) over the full prompt: -1 text, k a token of image k


def field_of(sample, key, default=None):
    return sample.get(key, default) if isinstance(sample, dict) else getattr(sample, key, default)


def images_and_text(sample) -> tuple[list, str]:
    """A sample's images and text: a string, ``{"prompt": ...}``, ``{"images"|"image", "question"}``,
    ``{"context", "question"}`` or an object with those attributes (``data.shapes.Sample``)."""
    if isinstance(sample, str):
        return [], sample
    if isinstance(sample, dict) and "prompt" in sample:
        return list(sample.get("images", [])), sample["prompt"]
    images = field_of(sample, "images")
    if images is None:
        image = field_of(sample, "image")
        images = [] if image is None else [image]
    context, question = field_of(sample, "context"), field_of(sample, "question")
    return list(images), question if context is None else f"{context}\n\n{question}"


class Adapter:
    """A decoder-only language model whose layers are pre-norm attention + MLP blocks (Llama's
    layout). Subclasses override what their architecture does differently."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    hf_class: ClassVar[str] = "AutoModelForCausalLM"  # what load() builds a checkpoint with
    multimodal: ClassVar[bool] = False
    query_after: ClassVar[bool] = False  # can feed a question after compressing the context
    text_perplexity: ClassVar[bool] = True  # its LM reads real text
    # attention modules whose scores attention_logits recomputes exactly (tested against eager)
    attention_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, tokenizer, processor=None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    # --- the decoder ----------------------------------------------------------------------
    @property
    def decoder(self):
        """The decoder stack (``.layers``, ``.norm``, ``.rotary_emb``, ``.embed_tokens``)."""
        inner = self.model.model
        return getattr(inner, "language_model", inner)

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def layers(self):
        return self.decoder.layers

    @property
    def image_token_id(self) -> int | None:
        return getattr(self.model.config, "image_token_id", None) if self.multimodal else None

    def dims(self) -> dict[str, int]:
        """What the analytic FLOPs counter needs."""
        c = self.decoder.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return {"hidden": c.hidden_size, "q_dim": c.num_attention_heads * hd, "kv_dim": c.num_key_value_heads * hd,
                "ffn": c.intermediate_size, "vocab": c.vocab_size, "layers": len(self.layers)}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor, layer: int):
        """(cos, sin) for ``layer`` at ``positions`` (one rotary table for every layer here)."""
        return self.decoder.rotary_emb(hidden, positions)

    def rotary_key(self, layer: int):
        """Layers with the same key share one rotary table (one for all here)."""
        return None

    def rotary_tables(self, hidden: torch.Tensor, positions: torch.Tensor) -> list:
        """(cos, sin) of every layer for tokens that enter all layers alike (decoding): one per table."""
        tables: dict = {}
        for i in range(len(self.layers)):
            if self.rotary_key(i) not in tables:
                tables[self.rotary_key(i)] = self.rotary(hidden, positions, i)
        return [tables[self.rotary_key(i)] for i in range(len(self.layers))]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head of ``hidden`` (1, q, d) -> (q, vocab) float."""
        return self.lm_head(self.decoder.norm(hidden))[0].float()

    def sliding_window(self, layer: int) -> int | None:
        return getattr(self.layers[layer].self_attn, "sliding_window", None)

    def attention_mask(self, layer: int, past: int, q: int) -> torch.Tensor | None:
        """Boolean (1, 1, q, past + q) mask for ``q`` new tokens after ``past`` cached ones, or None
        where SDPA's own causal rule is exact (no window, and a full prefill or one decoded token)."""
        window = self.sliding_window(layer)
        if window is not None and past + q <= window:
            window = None  # every key is inside the window
        if window is None and (past == 0 or q == 1):
            return None
        dev = self.lm_head.weight.device
        qi = past + torch.arange(q, device=dev)[:, None]
        ki = torch.arange(past + q, device=dev)[None, :]
        allowed = ki <= qi
        if window is not None:  # transformers' sliding_window_overlay: kv_idx > q_idx - window
            allowed &= ki > qi - window
        return allowed[None, None]

    # --- attention scores, recomputed beside SDPA ------------------------------------------
    def check_attention(self, layer: int, method: str | None = None) -> None:
        attn = self.layers[layer].self_attn
        if type(attn).__name__ not in self.attention_classes:
            who = f"{method} needs" if method else "recomputing"
            raise MethodError(f"{who} attention scores of {self.model.config.model_type} "
                              f"({type(attn).__name__}), which the {self.name} adapter cannot recompute "
                              f"exactly (it knows {', '.join(self.attention_classes) or 'none'})")

    def attention_output(self, layer: int) -> torch.nn.Module:
        """The module whose input is the concatenation of the heads' outputs (1, n, heads * head_dim)."""
        return self.layers[layer].self_attn.o_proj

    def attention_logits(self, layer: int, hidden: torch.Tensor, pe, keys: torch.Tensor,
                         rows: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax scores (heads, len(rows), n) of ``layer`` for the query ``rows`` of its input
        ``hidden`` (1, n, d), against its own rotated prefill ``keys``; masked entries are -inf.
        Follows the module: per-head q_norm, its ``scaling``, logit softcapping, sliding window.
        ``allowed`` (1 or heads, len(rows), n), where a method restricted the layer, replaces the causal rule."""
        block = self.layers[layer]
        attn = block.self_attn
        n = hidden.shape[1]
        x = block.input_layernorm(hidden[:, rows])
        q = attn.q_proj(x).view(1, rows.numel(), -1, attn.head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3 / Gemma3: RMSNorm per head before RoPE
            q = attn.q_norm(q)
        cos, sin = pe
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, _ = rope(q, q, cos[..., rows, :], sin[..., rows, :])
        k = keys[:, :, :n]  # already normed and rotated as the layer cached them
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = ((q * attn.scaling) @ k.transpose(-1, -2)).float()  # scale q, not the (q x k) map
        cap = getattr(attn, "attn_logit_softcapping", None)
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        ki = torch.arange(n, device=hidden.device)[None, :]
        if allowed is not None:  # the window is already part of a restricted pattern
            return scores.masked_fill_(~allowed[None], float("-inf"))[0]
        masked = ki > rows[:, None]
        window = self.sliding_window(layer)
        if window is not None:
            masked |= ki <= rows[:, None] - window
        return scores.masked_fill_(masked, float("-inf"))[0]  # in place: these maps can be heads x n x n

    # --- Mixture-of-Depths -------------------------------------------------------------------
    def weighted_layer(self, layer: int, hidden, positions, pe, cache, w, mask=None):
        """x + attn(x) + w * mlp(x + attn(x)) for the routed tokens (p-MoD's STRing update)."""
        block = self.layers[layer]
        attn = block.self_attn(hidden_states=block.input_layernorm(hidden), attention_mask=mask,
                               position_ids=positions if positions.dim() == 2 else None, past_key_values=cache,
                               use_cache=True, position_embeddings=pe)[0]
        h = hidden + attn
        return h + w[None, :, None].to(h.dtype) * block.mlp(block.post_attention_layernorm(h))

    # --- prompts -----------------------------------------------------------------------------
    def encode(self, sample) -> Inputs:
        """A question string gets the chat template where the tokenizer has one; ``{"prompt": text}``
        is tokenised raw. ``query_after=True`` samples mark where the question starts."""
        images, text = images_and_text(sample)
        if images:
            raise MethodError(f"{self.model.config.model_type} is a text-only model; pass text, not an image sample")
        raw = isinstance(sample, dict) and "prompt" in sample
        if getattr(self.tokenizer, "chat_template", None) and not raw:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        return Inputs(ids, context_len=self.question_start(text, ids, sample))

    def question_start(self, prompt: str, ids: torch.Tensor, sample, **tok_kw) -> int | None:
        """Token index where the question starts, for samples that ask for ``query_after``."""
        if not field_of(sample, "query_after", False):
            return None
        if not self.query_after:
            raise MethodError(f"query_after (question fed after compressing the context) is not supported by the "
                              f"{self.name} adapter; it is for text LMs and tiny-llava")
        start = prompt.rfind(field_of(sample, "question"))
        offsets = self.tokenizer(prompt, return_offsets_mapping=True, **tok_kw)["offset_mapping"]
        assert len(offsets) == ids.shape[1]
        return next(i for i, (a, _) in enumerate(offsets) if a >= start)

    def image_features(self, inputs: Inputs) -> list[torch.Tensor]:
        return []

    def image_grid(self, inputs: Inputs) -> tuple[int, int] | None:
        return None

    def vision_states(self, inputs: Inputs) -> list[VisionStates]:
        """Per image, the vision tower's states before the projector, for methods that select or merge
        there (VisionZip); adapters of towers with a [CLS] token implement it."""
        raise MethodError(f"the {self.name} adapter does not expose its vision tower's states "
                          f"(needed by methods that work inside the tower, e.g. visionzip)")

    def project(self, states: torch.Tensor) -> torch.Tensor:
        raise MethodError(f"the {self.name} adapter does not expose its projector")

    def positions(self, inputs: Inputs) -> torch.Tensor:
        ids = inputs.input_ids
        return torch.arange(ids.shape[1], device=ids.device)[None]

    def assemble(self, inputs: Inputs, feats: list[torch.Tensor], image_kept: dict) -> Prompt:
        ids = inputs.input_ids
        return Prompt(self.embed(ids), self.positions(inputs), torch.arange(ids.shape[1], device=ids.device),
                      torch.full((ids.shape[1],), -1, dtype=torch.long))

    # --- data for the weight quantizers -----------------------------------------------------
    def calibration(self, n: int, length: int, data: str = "mixed") -> list[Inputs]:
        """``n`` windows of ``length`` tokens of calibration text (``mmlab.data.calibration_windows``:
        ``mixed`` or ``docstrings``), never from the text perplexity is measured on."""
        from mmlab.data.text import calibration_windows

        try:
            return [Inputs(w[None]) for w in calibration_windows(self.tokenizer, n, length, data)]
        except ValueError as e:
            raise MethodError(str(e)) from None
