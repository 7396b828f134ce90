"""The method interface: four named stages the engine calls, and a registry by name.

A method is a dataclass whose fields are its paper's hyper-parameters (with the
paper's defaults). It overrides only the stages it acts at; the base class's stages do
nothing. Per-run state lives in ``ctx.scratch``, never on the method object, so one
method instance can be reused across runs.

Stages, in the order the engine calls them (see ``mmlab/engine.py``):

``image_features(ctx, feats) -> feats``
    ``feats`` is a list with one ``(n_i, d)`` tensor of projected image features per
    image. Return the features to place in the prompt (fewer rows = pruned / merged).
    Record choices with ``ctx.record_image_selection(image, kept, merged_into=None)``.
``before_layer(ctx, layer, tokens)``
    Called before every decoder layer of the prefill. ``tokens`` is the live sequence
    (``tokens.hidden``, ``.positions``, ``.source``, ``.is_image``); call
    ``tokens.keep(indices)`` to physically drop the others from this layer on, or
    ``tokens.route(indices, weights=None)`` (Mixture-of-Depths) to let only those through
    this one layer while the others ride the residual stream to the next.
    ``ctx.attention(layer - 1, queries)`` gives attention probabilities of the previous
    layer (computed on demand for those queries only; the model stays on SDPA).
``after_prefill(ctx, cache)``
    Evict / merge / quantize the per-layer KV cache (``cache.keys[i]``, ``cache.values[i]``,
    shape ``(1, kv_heads, len_i, head_dim)``; lengths may differ per layer). A method with
    the class flag ``prefill_attention = True`` may call ``ctx.attention(layer)`` for every
    layer here.
``decode_step(ctx, step, cache)``
    Called before each generated token is processed.

Weight quantization (``mmlab.methods.quant``) has one more stage, ``quantize_weights(wctx)``,
run once per (model, method) before any prefill: the engine caches its de-quantized
weights and swaps them in for every run that lists the method (``mmlab/quantize.py``).

``ctx`` offers: ``n_layers``, ``config`` (the text config), ``n_image_tokens`` (after
image-feature methods), ``image_grid`` ((rows, cols) of one image's tokens, or None),
``extras`` (what the checkpoint carries besides weights, e.g. trained MoD routers),
``trace``, ``scratch`` (dict), ``attention(layer, queries)`` and ``attention_logits``
(pre-softmax, causal entries -inf).

Batch size is 1: the engine runs one sample at a time, so every method selects per
sample (pruned sequences of different lengths are never padded into a batch).
Methods import only this module and torch; they never import the engine or models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

_REGISTRY: dict[str, type["Method"]] = {}


class MethodError(ValueError):
    """A method's parameters are invalid, or it cannot run on this model / input."""


@dataclasses.dataclass
class Method:
    name: ClassVar[str] = "method"
    family: ClassVar[str] = ""
    needs_image: ClassVar[bool] = False  # True: raises on a text-only model / sample
    prefill_attention: ClassVar[bool] = False  # True: ctx.attention(any layer) works in after_prefill

    def validate(self, ctx) -> None:
        """Check the parameters against the model (depth, modality). Raise MethodError."""
        if self.needs_image and not ctx.has_image:
            raise MethodError(f"{self.name} prunes visual tokens but this input has no image "
                              f"(model {ctx.model_name!r}); use it with a multimodal model and an image sample")

    def image_features(self, ctx, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return feats

    def before_layer(self, ctx, layer: int, tokens) -> None:
        return None

    def after_prefill(self, ctx, cache) -> None:
        return None

    def decode_step(self, ctx, step: int, cache) -> None:
        return None

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})"


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``get(name)``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, **params) -> Method:
    """Build a registered method by name with its paper's defaults overridden by ``params``."""
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(available())}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - fields
    if unknown:
        raise MethodError(f"{name} has no parameter {', '.join(sorted(unknown))}; valid: {', '.join(sorted(fields)) or 'none'}")
    return cls(**params)


def keep_count(n: int, keep_ratio: float) -> int:
    """Tokens kept out of ``n`` at ``keep_ratio`` (at least one)."""
    return max(1, min(n, int(round(n * keep_ratio))))


def check_budget(name: str, budget) -> None:
    """A KV budget is a fraction of the prompt's KV in (0, 1] (float) or a token count >= 1 (int)."""
    ok = (isinstance(budget, float) and 0 < budget <= 1) or (isinstance(budget, int) and not isinstance(budget, bool)
                                                              and budget >= 1)
    if not ok:
        raise MethodError(f"{name}: budget must be a fraction of the prompt in (0, 1] (e.g. 0.5) or a token "
                          f"count >= 1 (e.g. 256), got {budget!r}")


def budget_tokens(budget, n: int) -> int:
    """Tokens kept out of ``n`` under ``budget`` (a fraction is floored, as kvpress does; at least 1)."""
    return max(1, min(n, budget if isinstance(budget, int) else int(n * budget)))


def check_ratio(name: str, value: float, what: str = "keep_ratio") -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise MethodError(f"{name}: {what} must be in (0, 1], got {value!r}")
