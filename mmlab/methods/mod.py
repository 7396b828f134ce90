"""Mixture-of-Depths for vision tokens: training-free routing with p-MoD's and gamma-MoD's schedules.

In a routed layer only the selected vision tokens (and every text token) go through
attention + MLP and write that layer's KV; the other vision tokens pass the layer on the
residual stream unchanged and are still there for later layers (``tokens.route``). So the
KV cache of a routed layer really holds fewer tokens, and FLOPs follow the Trace's counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmlab.methods.base import Method, MethodError, register

SCHEDULES = ("constant", "linear", "prd")
SCORES = ("attention", "norm")


def prd_ratio(layer: int, n_layers: int, max_ratio: float = 0.85, min_ratio: float = 0.15) -> float:
    """p-MoD's progressive ratio decay: the shifted cosine (1 + cos(pi l / (L - 1))) / 2, dense
    (1.0) while it is above ``max_ratio``, floored at ``min_ratio`` (mean 0.5375 over 32 layers)."""
    v = (1 + math.cos(math.pi * layer / max(1, n_layers - 1))) / 2
    return 1.0 if v > max_ratio else max(min_ratio, v)


def attention_rank(probs: torch.Tensor) -> float:
    """gamma-MoD's ARank of one layer on one prompt: the mean over heads of the rank of the causal
    attention map (heads, n, n) with its diagonal zeroed. Low rank = a redundant layer."""
    a = probs.float() * (1 - torch.eye(probs.shape[-1], device=probs.device))
    return float(torch.linalg.matrix_rank(a).float().mean())


def arank_layers(ranks: list[float], k: int) -> list[int]:
    """gamma-MoD's layer choice: the ``k`` layers of lowest ARank, in order; layer 0 stays dense
    (nothing before it to route by)."""
    return sorted(sorted(range(1, len(ranks)), key=lambda i: ranks[i])[:k])


@register
@dataclass
class MoD(Method):
    """Training-free Mixture-of-Depths over vision tokens (the setting of p-MoD and gamma-MoD).

    Rule: before each routed layer l, keep the top ``ratio(l)`` of the live vision tokens by
    ``score`` (``attention``: attention the last prompt token gave them in layer l-1, head
    mean; ``norm``: hidden-state L2 norm) for attention + MLP; the rest skip layer l on the
    residual stream and write no KV there. Text tokens are always processed. ``schedule``:
    ``prd`` (p-MoD's progressive ratio decay, 0.85 / 0.15 clipping), ``constant`` (``ratio``
    from ``start_layer`` on), ``linear`` (``max_ratio`` at ``start_layer`` down to ``min_ratio``
    at the last layer). ``layers`` (e.g. chosen by ARank) restricts routing to those layers at
    a constant ``ratio``.
    """

    name = "mod"
    family = "mod"
    knob = "ratio"
    needs_image = True
    schedule: str = "prd"
    ratio: float = 0.5
    max_ratio: float = 0.85
    min_ratio: float = 0.15
    start_layer: int = 1
    layers: tuple | None = None
    score: str = "attention"

    def ratios(self, n_layers: int) -> list[float]:
        """Fraction of vision tokens each layer processes (1.0 = dense)."""
        if self.layers is not None:
            return [self.ratio if i in set(self.layers) else 1.0 for i in range(n_layers)]
        if self.schedule == "prd":
            return [prd_ratio(i, n_layers, self.max_ratio, self.min_ratio) for i in range(n_layers)]
        out = []
        for i in range(n_layers):
            if i < self.start_layer:
                out.append(1.0)
            elif self.schedule == "constant":
                out.append(self.ratio)
            else:
                t = (i - self.start_layer) / max(1, n_layers - 1 - self.start_layer)
                out.append(self.max_ratio + (self.min_ratio - self.max_ratio) * t)
        return out

    def check(self) -> None:
        for what, v in (("ratio", self.ratio), ("max_ratio", self.max_ratio), ("min_ratio", self.min_ratio)):
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise MethodError(f"mod: {what} must be in [0, 1], got {v!r}")
        if self.min_ratio > self.max_ratio:
            raise MethodError(f"mod: min_ratio ({self.min_ratio}) is above max_ratio ({self.max_ratio})")
        if self.schedule not in SCHEDULES:
            raise MethodError(f"mod: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.score not in SCORES:
            raise MethodError(f"mod: score must be one of {', '.join(SCORES)}, got {self.score!r}")

    def validate(self, ctx) -> None:
        super().validate(ctx)
        if self.layers is not None and any(not isinstance(i, int) or not 0 <= i < ctx.n_layers for i in self.layers):
            raise MethodError(f"mod: layers must be indices in 0..{ctx.n_layers - 1}, got {self.layers!r}")
        if self.score == "attention" and self.ratios(ctx.n_layers)[0] < 1:
            raise MethodError("mod: layer 0 has no previous layer's attention to route by; keep it dense "
                              "(start_layer >= 1) or use score='norm'")

    def before_layer(self, ctx, layer, tokens):
        ratios = self.ratios(ctx.n_layers)
        if self.score == "attention" and layer >= 1 and min(ratios[layer:]) < 1:
            # the last prompt token's attention in the previous layer, kept per prompt token so a
            # token skipped there is ranked by the latest layer that did see it
            last = ctx.scratch.setdefault("mod_attention", torch.zeros(ctx.trace.prompt_length))
            att = ctx.attention(layer - 1, queries=[-1])[:, 0].mean(0)
            last[ctx.trace.layer_tokens[layer - 1].cpu()] = att.float().cpu()
        img = torch.nonzero(tokens.is_image).flatten()
        k = int(img.numel() * ratios[layer])  # trunc, as p-MoD's k = trunc(n_vision * ratio)
        if ratios[layer] >= 1 or img.numel() == 0 or k >= img.numel():
            return
        if self.score == "attention":
            s = ctx.scratch["mod_attention"][tokens.source.cpu()].to(tokens.hidden.device)
        else:
            s = tokens.hidden[0].float().norm(dim=-1)
        chosen = img[s[img].topk(k).indices]
        tokens.route(torch.cat([torch.nonzero(~tokens.is_image).flatten(), chosen]))


def mean_retention(ratios: list[float]) -> float:
    """Average fraction of vision tokens processed per layer (0.5375 for PRD on 32 layers)."""
    return sum(ratios) / len(ratios)


TANH_ALPHA = 0.2


class Routers(torch.nn.Module):
    """One zero-initialised Linear(hidden, 1) per routed layer (``shared``: one for all of them)."""

    def __init__(self, hidden: int, ratios: list[float], shared: bool = False):
        super().__init__()
        self.ratios = list(ratios)
        routed = [i for i, r in enumerate(ratios) if r < 1]
        n = 1 if shared else len(routed)
        self.linears = torch.nn.ModuleList(torch.nn.Linear(hidden, 1) for _ in range(n))
        for lin in self.linears:
            torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
        self.index = {layer: 0 if shared else k for k, layer in enumerate(routed)}

    def score(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.linears[self.index[layer]](x).squeeze(-1)

    @staticmethod
    def weight(score: torch.Tensor) -> torch.Tensor:
        return TANH_ALPHA * torch.tanh(score) + 1  # TanhNorm

    def config(self) -> dict:
        return {"ratios": self.ratios, "shared": len(self.linears) == 1 and len(self.index) > 1,
                "tanh_alpha": TANH_ALPHA}


@register
@dataclass
class TrainedMoD(Method):
    """p-MoD / gamma-MoD as trained (``mmlab train-tiny --mod pmod|gmod``): the model's own routers.

    Rule: in each layer the trained schedule routes (or every routed layer at ``ratio`` when set),
    the model's router scores the vision tokens; the top fraction goes through attention + MLP as
    x + attn + w * mlp and the rest pass as w * x, with TanhNorm weights w = 0.2 tanh(r) + 1
    (STRing); text tokens are always processed. Needs a checkpoint with routers
    (``tiny-llava-pmod``, ``tiny-llava-gmod``).
    """

    name = "mod_trained"
    family = "mod"
    knob = "ratio"
    needs_image = True
    requires = {"mod": ("a model's trained routers",
                        "load tiny-llava-pmod or tiny-llava-gmod (mmlab train-tiny --mod pmod|gmod)")}
    ratio: float | None = None  # None: the trained schedule; a number: that ratio in every routed layer

    def check(self) -> None:
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio <= 1):
            raise MethodError(f"mod_trained: ratio must be in [0, 1] or None, got {self.ratio!r}")

    def ratios(self, ctx) -> list[float]:
        trained = ctx.extras["mod"].ratios
        return trained if self.ratio is None else [self.ratio if r < 1 else 1.0 for r in trained]

    def before_layer(self, ctx, layer, tokens):
        ratio = self.ratios(ctx)[layer]
        img = torch.nonzero(tokens.is_image).flatten()
        if ratio >= 1 or img.numel() == 0:
            return
        routers = ctx.extras["mod"]
        score = routers.score(layer, tokens.hidden[0, img].to(routers.linears[0].weight.dtype))
        top = img[score.topk(int(img.numel() * ratio)).indices]
        w = torch.ones(len(tokens), device=tokens.hidden.device)
        w[img] = routers.weight(score).to(w.dtype)
        # layer -> (source index, router weight) of every live visual token: the explorer's heat map
        ctx.trace.extra.setdefault("router_weights", {})[layer] = (tokens.source[img].cpu(), w[img].cpu())
        tokens.route(torch.cat([torch.nonzero(~tokens.is_image).flatten(), top]), weights=w)
