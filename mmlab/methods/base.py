"""The method interface: the stages the engine and the weight swap call, typed, and a registry by name.

A method is a dataclass whose fields are its paper's hyper-parameters (with the paper's
defaults). It overrides only the stages it acts at; the base class's stages do nothing.
Per-run state lives in ``ctx.scratch``, never on the method object, so one method instance
can be reused across runs. Methods import only this module and torch; they never import
the engine, the adapters or the models.

Stages, in the order they are called:

``quantize_weights(wctx: WeightContext)``  (class flag ``quantizes_weights``)
    Once per (model, method), before any prefill, by the weight swap (``mmlab/quantize.py``):
    write quantized weights with ``wctx.set``; they are cached and swapped in for every run
    that lists the method. ``for_model(wctx)`` runs first and may return an adapted copy.
``calibrate_activations(wctx) -> {linear: state}`` and ``quantize_activation(x, state)``
    An activation quantizer (its own method, or part of a weight method) is applied to the
    input of every target linear; ``state`` is what ``calibrate_activations`` returned for that
    linear (called once per (model, method), on the full-precision model; ``None`` without it).
``image_features(ctx, feats) -> feats``
    ``feats`` is a list with one ``(n_i, d)`` tensor of projected image features per
    image. Return the features to place in the prompt (fewer rows = pruned / merged).
    Record choices with ``ctx.record_image_selection(image, kept, merged_into=None)``.
    A method that selects inside the vision tower reads ``ctx.vision_states(image)`` (the
    tower's feature layer with [CLS], its [CLS] attention and keys, computed on demand; the
    tower stays on SDPA) and projects what it keeps with ``ctx.project(states)``.
``before_layer(ctx, layer, tokens)``
    Called before every decoder layer of the prefill. ``tokens`` is the live sequence;
    ``tokens.keep(indices)`` physically drops the others from this layer on (``merged_into=``
    pools dropped tokens into kept ones, ``reduce=`` "mean" or "amax"),
    ``tokens.route(indices, weights=None)`` (Mixture-of-Depths) lets only those through this
    one layer while the others ride the residual stream; ``tokens.restrict(allowed, head_gate=None)``
    sets this one layer's attention pattern ((1 | heads, n, n) bool, in place of the causal rule) and
    cuts heads' outputs per token (a mask: counted apart as ``prefill_sparse`` FLOPs, YOPO's cuts).
    ``ctx.attention(layer - 1, queries)``
    gives attention probabilities of the previous layer (recomputed by the model's adapter for
    those queries only; the model stays on SDPA).
``after_prefill(ctx, cache)``
    Evict / merge / quantize the per-layer KV cache (``cache.keys[i]``, ``cache.values[i]``,
    shape ``(1, kv_heads, len_i, head_dim)``; lengths may differ per layer). With the class
    flag ``prefill_attention`` the method may call ``ctx.attention(layer)`` for every layer.
``decode_step(ctx, step, cache)``
    Called before each generated token is processed.
``decode_layer(ctx, layer, token)``
    Called before every decoder layer of each decode step (and of each teacher-forced token a
    perplexity run feeds one at a time). ``token.hidden`` (1, 1, d) is the new token entering the
    layer; ``token.drop_kv()`` lets it attend as usual in this step but leaves its keys / values out
    of this layer's cache (Dynamic-LLaVA's output-text eviction).

The cache's ``quantized[i]`` contract (class flag ``quantizes_cache``): a method may move the
oldest tokens of layer i into a ``QuantizedPrefix`` that precedes ``keys[i]`` / ``values[i]``;
the cache de-quantizes it whenever the layer reads, and counts only its packed bytes. Such a
method must come after every other KV method of the run (the engine checks).

Batch size is 1: the engine runs one sample at a time, so every method selects per
sample (pruned sequences of different lengths are never padded into a batch).
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, ClassVar, Protocol

import torch

_REGISTRY: dict[str, type["Method"]] = {}


class MethodError(ValueError):
    """A method's parameters are invalid, or it cannot run on this model / input."""


# --- what the stages receive ----------------------------------------------------------------
class RunContext(Protocol):
    """``ctx`` of the prefill / decode stages (``mmlab.engine.Context``)."""

    model_name: str
    config: Any  # the decoder's (text) config
    n_layers: int
    has_image: bool
    trace: Any  # the run's mmlab.Trace
    sample_index: int
    n_image_tokens: int  # visual tokens in the prompt after image_features
    image_grid: tuple[int, int] | None  # (rows, cols) of one image's tokens, where they form a grid
    extras: dict  # what the checkpoint carries besides weights (e.g. trained MoD routers)
    scratch: dict  # per-run state of the methods

    def record_image_selection(self, image: int, kept: torch.Tensor,
                               merged_into: torch.Tensor | None = None) -> None: ...

    def cache_is_image(self, layer: int) -> torch.Tensor: ...

    def attention_logits(self, layer: int, queries=None) -> torch.Tensor: ...  # (heads, q, k), masked -inf

    def attention(self, layer: int, queries=None) -> torch.Tensor: ...  # softmax of attention_logits

    def attention_received(self, layer: int) -> torch.Tensor: ...  # (heads, k) summed over all queries, memoised

    def vision_states(self, image: int) -> Any: ...  # the tower's feature layer before the projector (VisionZip)

    def project(self, states: torch.Tensor) -> torch.Tensor: ...  # the projector: tower states -> visual tokens


class LiveTokens(Protocol):
    """``tokens`` of ``before_layer`` (``mmlab.engine.Tokens``)."""

    hidden: torch.Tensor  # (1, n, d)
    positions: torch.Tensor  # (1, n), or (3, 1, n) for M-RoPE
    source: torch.Tensor  # (n,) index of each token in the assembled prompt
    is_image: torch.Tensor  # (n,) bool

    def __len__(self) -> int: ...

    def keep(self, indices: torch.Tensor, merged_into: torch.Tensor | None = None, reduce: str = "mean") -> None: ...

    def route(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> None: ...

    def restrict(self, allowed: torch.Tensor, head_gate: torch.Tensor | None = None) -> None: ...


class NewToken(Protocol):
    """``token`` of ``decode_layer`` (``mmlab.engine.NewToken``)."""

    hidden: torch.Tensor  # (1, 1, d) entering the layer
    position: torch.Tensor  # its RoPE position

    def drop_kv(self) -> None: ...


class QuantizedPrefix(Protocol):
    """One layer's quantized oldest tokens (see the ``quantized`` contract above)."""

    length: int

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None: ...

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def nbytes(self) -> int: ...


class Cache(Protocol):
    """``cache`` of ``after_prefill`` / ``decode_step`` (``mmlab.engine.KVCache``)."""

    keys: list[torch.Tensor | None]  # per layer (1, kv_heads, len_i, head_dim)
    values: list[torch.Tensor | None]
    quantized: list[QuantizedPrefix | None]

    def lengths(self) -> list[int]: ...

    def nbytes(self) -> int: ...


class WeightContext(Protocol):
    """``wctx`` of ``quantize_weights`` (``mmlab.quantize.WeightContext``)."""

    model_name: str
    linears: dict[str, torch.nn.Linear]  # the target linears, in execution order
    blocks: list[list[str]]  # their names grouped by block (a decoder / encoder layer)

    def calibration(self, n: int, length: int) -> list: ...

    def hessians(self, names: list[str], calib) -> dict[str, torch.Tensor]: ...

    def inputs(self, names: list[str], calib, max_tokens: int = 2048) -> dict[str, torch.Tensor]: ...

    def current_inputs(self, names: list[str], calib, max_tokens: int = 2048) -> dict[str, torch.Tensor]: ...

    def gradients(self, calib) -> dict[str, torch.Tensor]: ...

    def input_absmax(self, calib) -> dict[str, torch.Tensor]: ...

    def set(self, name: str, weight: torch.Tensor, storage_bits: float, outliers: int = 0) -> None: ...

    def note(self, name: str, **info) -> None: ...


# --- the base class ---------------------------------------------------------------------------
@dataclasses.dataclass
class Method:
    name: ClassVar[str] = "method"
    family: ClassVar[str] = ""
    knob: ClassVar[str | None] = None  # the parameter a sweep varies: keep_ratio / ratio / budget / bits
    needs_image: ClassVar[bool] = False  # True: raises on a text-only model / sample
    prefill_attention: ClassVar[bool] = False  # True: ctx.attention(any layer) works in after_prefill
    quantizes_weights: ClassVar[bool] = False  # True: has quantize_weights, run once by the weight swap
    quantizes_cache: ClassVar[bool] = False  # True: writes cache.quantized (must come last among KV methods)
    # what the checkpoint must carry besides weights: ``ctx.extras`` key -> (what it is, how to get it)
    requires: ClassVar[dict[str, tuple[str, str]]] = {}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Check the parameters on their own (ranges, choices); called at construction, so a bad
        value fails where it is written, before any model is loaded. Raise MethodError."""

    def validate(self, ctx: RunContext | None) -> None:
        """Check the parameters against the model (depth, modality) before a run; raise MethodError.
        Weight methods are validated with ``ctx=None`` before calibration."""
        self.check()  # a field may have been changed since construction
        if ctx is not None:
            self.check_extras(ctx.model_name, ctx.extras)
        if self.needs_image and not ctx.has_image:
            raise MethodError(f"{self.name} prunes visual tokens but this input has no image "
                              f"(model {ctx.model_name!r}); use it with a multimodal model and an image sample")

    def check_extras(self, model_name: str, extras: dict) -> None:
        """Refuse, in one line, a setting that needs checkpoint extras (``requires``) the model lacks; callable
        before any run (``evaluate`` does, so a refusal comes before the first sample)."""
        for key, (what, hint) in self.requires.items():
            if key not in extras and self.uses_extras():
                raise MethodError(f"{self.name} needs {what} and {model_name!r} has none; {hint}")

    def keeps_everything(self) -> bool:
        """True at a setting that changes nothing."""
        return False

    def uses_extras(self) -> bool:
        """False at a setting that runs without the extras it ``requires`` (default: a keep-everything one)."""
        return not self.keeps_everything()

    def for_model(self, wctx: WeightContext) -> "Method":
        """The method as it runs on this model's linears (a weight quantizer may adapt a parameter
        the model cannot take, noting it with ``wctx.note``); called by the swap before
        ``quantize_weights``. Default: itself."""
        return self

    def quantize_weights(self, wctx: WeightContext) -> None:
        return None

    def calibrate_activations(self, wctx: WeightContext) -> dict[str, Any]:
        return {}

    def quantize_activation(self, x: torch.Tensor, state: Any = None) -> torch.Tensor:
        return x

    @classmethod
    def quantizes_activations(cls) -> bool:
        return cls.quantize_activation is not Method.quantize_activation

    def image_features(self, ctx: RunContext, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return feats

    def before_layer(self, ctx: RunContext, layer: int, tokens: LiveTokens) -> None:
        return None

    def after_prefill(self, ctx: RunContext, cache: Cache) -> None:
        return None

    def decode_step(self, ctx: RunContext, step: int, cache: Cache) -> None:
        return None

    def decode_layer(self, ctx: RunContext, layer: int, token: NewToken) -> None:
        return None

    @classmethod
    def acts_in_decode_layers(cls) -> bool:
        return cls.decode_layer is not Method.decode_layer

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})"


def needs_swap(method: Method) -> bool:
    """True for weight and activation quantizers: they act through the swap around the engine
    (``mmlab.quantize.applied``), not at an engine stage."""
    return method.quantizes_weights or method.quantizes_activations()


# --- the registry -----------------------------------------------------------------------------
def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``get(name)``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def get(name: str, **params) -> Method:
    """Build a registered method by name with its paper's defaults overridden by ``params``."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - fields
    if unknown:
        raise MethodError(f"{name} has no parameter {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(fields)) or 'none'}")
    return cls(**params)


def parse(spec: str | None) -> list[Method]:
    """Methods from one spec string, the syntax shared by the CLI, sweeps and the benchmark plugins:
    ``divprune(keep_ratio=0.098)+snapkv(budget=0.5)``; a bare name takes the paper's defaults;
    ``""`` / ``none`` / ``dense`` is no method. Values are Python literals."""
    text = (spec or "").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # quoted on a command line (lmms-eval model_args)
        text = text[1:-1].strip()
    if text.lower() in ("", "none", "dense"):
        return []
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise MethodError(f"method spec {spec!r} is not valid; write name(param=value)+name(...), "
                          f"e.g. divprune(keep_ratio=0.098)+snapkv(budget=0.5)") from None
    terms = []
    while isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.Add):
        terms.insert(0, tree.right)
        tree = tree.left
    return [_parse_term(t, spec) for t in [tree, *terms]]


def as_methods(methods) -> list[Method]:
    """What the public calls accept as ``methods``: a Method, a name or spec string
    (``"divprune(keep_ratio=0.1)+h2o(budget=0.5)"``), ``None``, or a list / tuple of those."""
    if methods is None:
        return []
    if isinstance(methods, (Method, str)):
        methods = [methods]
    if not isinstance(methods, (list, tuple)):
        raise MethodError(f"methods must be a method, a name or spec string (e.g. 'divprune(keep_ratio=0.1)"
                          f"+h2o(budget=0.5)') or a list of them, got {type(methods).__name__}")
    out = []
    for m in methods:
        if isinstance(m, str):
            out += parse(m)
        elif isinstance(m, Method):
            out.append(m)
        else:
            raise MethodError(f"methods must be methods (mmlab.methods.get(...)) or names / spec strings, "
                              f"got {m!r} ({type(m).__name__})")
    return out


def _parse_term(node: ast.AST, spec: str) -> Method:
    if isinstance(node, ast.Name):
        return get(node.id)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise MethodError(f"method spec {spec!r}: {ast.unparse(node)!r} is not name(param=value, ...)")
    if node.args:
        raise MethodError(f"method spec {spec!r}: give {node.func.id}'s parameters by name "
                          f"(e.g. {node.func.id}({knob_hint(node.func.id)}=...)), not by position")
    params = {}
    for kw in node.keywords:
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise MethodError(f"method spec {spec!r}: {node.func.id}'s {kw.arg}={ast.unparse(kw.value)} is "
                              f"not a literal (number, string, True/False, None, list)") from None
    return get(node.func.id, **params)


def defaults(name: str) -> dict[str, Any]:
    """Method ``name``'s parameters and their (paper) defaults: what a notebook or the explorer offers."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(method_class(name))}


def knob_hint(name: str) -> str:
    return method_class(name).knob or "param"


def spec(methods) -> str:
    """The spec string of a list of methods (``parse(spec(ms))`` rebuilds them); ``none`` for no method."""
    return "+".join(f"{m.name}({', '.join(f'{k}={v!r}' for k, v in m.params().items())})" for m in methods) \
        or "none"


def knob(name: str) -> str:
    """The parameter that sets how much method ``name`` keeps (or its bits): what a sweep varies."""
    k = method_class(name).knob
    if k is None:
        raise MethodError(f"method {name!r} has no keep_ratio / ratio / budget / bits parameter to sweep")
    return k


# --- shared parameter rules ---------------------------------------------------------------------
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
