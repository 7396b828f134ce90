"""Applying weight quantization: calibration, one-time computation, swapping, real kernels.

A weight method (``mmlab.methods.quant``) computes its de-quantized weights once per
(model, method) through a ``WeightContext``; ``applied(bundle, methods)`` swaps them in
for the duration of a run (pointer swaps: cheap enough per sample) and installs the
activation quantizer's input hooks. It wraps the engine from outside: ``mmlab.run`` /
``mmlab.prefill`` / ``evaluate`` / ``perplexity`` enter it around the engine's calls (nested
entries with the same method are free), and calibration drives the engine's dense prefill.

``torchao_quantize`` builds the *real* counterpart with torchao's kernels for the bytes
and speed columns: on CPU, int8 weight-only and int8 dynamic-activation kernels, and
``IntxWeightOnlyConfig`` for 1..8-bit weights (stored one code per int8 byte on CPU: the
bytes do not shrink below int8; packed int4 kernels need a GPU).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from mmlab.engine import prefill
from mmlab.methods.base import Method, MethodError
from mmlab.models import active_activations, set_active_activations, set_active_weights
from mmlab.threads import follow as follow_threads
from mmlab.threads import pinned

_BLOCK = re.compile(r"^(.*\.layers\.\d+)\.")


class _Stop(Exception):
    """Raised by a hook once a block's linears have all run: the rest of the forward is not needed."""


@dataclass
class QuantizedWeights:
    """The outcome of one weight method on one model."""

    method: str
    weights: dict[str, torch.Tensor]  # de-quantized weights by module name
    storage_bits: dict[str, float]  # bits the packed format holds per linear: codes + scales/zeros + outliers
    numel: dict[str, int]
    other_bytes: int  # parameters left in their dtype (embeddings, norms, unquantized linears)
    outliers: int = 0
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def weight_bits(self) -> float:
        """Effective bits per quantized weight, scales / zeros / outliers included."""
        n = sum(self.numel.values())
        return sum(self.storage_bits.values()) / n if n else float("nan")

    @property
    def packed_bytes(self) -> int:
        """Model bytes in the packed format: quantized linears at their storage bits, the rest as held."""
        return int(self.other_bytes + sum(self.storage_bits.values()) / 8)

    def summary(self) -> dict:
        return {"weight_bits": self.weight_bits, "packed_bytes": self.packed_bytes, "outliers": self.outliers,
                "quantized_linears": len(self.weights), "quantize_seconds": self.seconds,
                **self.notes.get("*", {})}  # what the method adapted to this model (e.g. its group size)


def target_linears(bundle, targets) -> dict[str, torch.nn.Linear]:
    """The linears a method quantizes, in execution order: "llm" (decoder layers), "vision" (vision
    tower + projector), "all", or () for none. Embeddings and the LM head stay in full precision."""
    if targets == () or targets is None:
        return {}
    in_llm = {id(m) for m in bundle.decoder.layers.modules()}
    head = id(bundle.lm_head)
    out = {}
    for name, mod in bundle.model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or id(mod) == head:
            continue
        llm = id(mod) in in_llm
        if targets == "all" or (targets == "llm") == llm:
            out[name] = mod
    if not out:
        raise MethodError(f"{bundle.name} has no {targets!r} linears to quantize; valid targets here: "
                          f"{'llm, vision, all' if bundle.multimodal else 'llm'}")
    return out


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes actually held by ``t``, looking inside tensor subclasses (torchao's quantized weights)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
    return t.numel() * t.element_size()


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as held (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if hasattr(t, "__tensor_flatten__") and type(t) is not torch.nn.Parameter else t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


class Calibration(list):
    """The calibration samples, with the ``(n, length)`` they were drawn by (a cache key)."""

    def __init__(self, samples, key: tuple):
        super().__init__(samples)
        self.key = key


SHARED_BYTES = 2 << 30  # full-precision calibration statistics kept per model (AWQ's inputs: ~0.8 GiB for smollm2)
_SHARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {"key", "items", "bytes"}


class WeightContext:
    """What a weight method sees (see ``mmlab.methods.quant``)."""

    def __init__(self, bundle, targets):
        self.bundle = bundle
        self.model_name = bundle.name
        self.linears = target_linears(bundle, targets)
        blocks: OrderedDict[str, list[str]] = OrderedDict()
        for name in self.linears:
            m = _BLOCK.match(name)
            blocks.setdefault(m.group(1) if m else name.rsplit(".", 1)[0], []).append(name)
        self.blocks = list(blocks.values())
        self.storage_bits: dict[str, float] = {}
        self.outliers = 0
        self.notes: dict[str, dict] = {}
        self._original = {n: m.weight for n, m in self.linears.items()}
        self._modules = dict(bundle.model.named_modules())
        self._carry: dict[str, list] = {}  # layer name -> its (args, kwargs) per calibration sample

    # --- data ---------------------------------------------------------------------------
    def calibration(self, n: int, length: int, data: str = "mixed") -> Calibration:
        """``n`` calibration samples, the adapter's way: ``length``-token windows of the ``data`` text
        set (``mixed`` / ``docstrings`` / the ``prose`` diagnostic; ``mmlab.data.calibration_windows``)
        for text LMs; training-split shapes questions for VLMs."""
        if n < 1:
            raise MethodError(f"calibration needs at least one sample, got {n}")
        return Calibration(self.bundle.adapter.calibration(n, length, data), key=(n, length, data))

    @torch.no_grad()
    def _layer_inputs(self, layer: str, calib) -> list:
        """(args, kwargs) of decoder / encoder layer ``layer`` per calibration sample: the previous
        layer's outputs on the current (already quantized) weights, or captured by a forward that
        stops at the layer the first time."""
        m = re.match(r"^(.*\.layers\.)(\d+)$", layer)
        prev = f"{m.group(1)}{int(m.group(2)) - 1}"
        if prev in self._carry:
            inputs = []
            for args, kwargs in self._carry.pop(prev):
                out = self._modules[prev](*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                inputs.append(((out,) + tuple(args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": out}))
        else:
            inputs = []

            def grab(mod, args, kwargs):
                kwargs = {**kwargs}
                if "past_key_values" in kwargs:  # run alone, without the engine's cache
                    kwargs.update(past_key_values=None, use_cache=False)
                inputs.append((args, kwargs))
                raise _Stop

            handle = self._modules[layer].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                for s in calib:
                    try:
                        prefill(self.bundle, s, [])
                    except _Stop:
                        pass
            finally:
                handle.remove()
        self._carry = {layer: inputs}
        return inputs

    @torch.no_grad()  # the captured layer inputs are inference tensors
    def _forward_with_hooks(self, names: list[str], calib, on_input) -> None:
        """Run each calibration sample until every linear in ``names`` has seen its input: the block's
        layer alone where the block is a layer of a stack, otherwise the model up to the block."""
        follow_threads()
        m = _BLOCK.match(names[0])
        layer_inputs = self._layer_inputs(m.group(1), calib) if m else None
        for i, s in enumerate(calib):
            pending = set(names)
            ids: dict[int, tuple] = {}  # one key per distinct input tensor (q/k/v share theirs)

            def pre(mod, args, name):
                x = args[0]
                key = ids.setdefault(id(x), (name, x))[0]  # holding x keeps its id from being reused
                on_input(name, key, x.reshape(-1, x.shape[-1]).float())

            def post(mod, args, out, name):
                pending.discard(name)
                if not pending and layer_inputs is None:
                    raise _Stop

            handles = []
            for n in names:
                mod = self.linears[n]
                handles.append(mod.register_forward_pre_hook(lambda m, a, n=n: pre(m, a, n)))
                handles.append(mod.register_forward_hook(lambda m, a, o, n=n: post(m, a, o, n)))
            try:
                if layer_inputs is not None:
                    args, kwargs = layer_inputs[i]
                    self._modules[m.group(1)](*args, **kwargs)
                else:
                    prefill(self.bundle, s, [])
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()

    def hessians(self, names: list[str], calib) -> dict[str, torch.Tensor]:
        """GPTQ's H = 2 X^T X / N per linear, from the inputs it sees on the current weights."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        share: dict[str, str] = {}

        def on_input(name, key, x):
            share[name] = key
            if key == name:
                sums[key] = sums.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]

        self._forward_with_hooks(names, calib, on_input)
        return {n: 2 * sums[share[n]] / counts[share[n]] for n in names}

    def inputs(self, names: list[str], calib, max_tokens: int = 2048) -> dict[str, torch.Tensor]:
        """Calibration inputs (tokens, in_features) per linear; linears reading the same tensor share
        one object (AWQ groups them). Evenly subsampled to ``max_tokens`` rows (``shared``)."""
        return self._shared(("inputs", tuple(names), max_tokens), calib,
                            lambda: self._collect_inputs(names, calib, max_tokens))

    def current_inputs(self, names: list[str], calib, max_tokens: int = 2048) -> dict[str, torch.Tensor]:
        """As ``inputs``, but on the current (partly quantized) weights and never kept."""
        return self._collect_inputs(names, calib, max_tokens)

    def _shared(self, item: tuple, calib, compute):
        """``compute()``, kept for every later context on the same model, targets and calibration set
        while it is a full-precision statistic (no weight set yet), up to ``SHARED_BYTES`` per model."""
        if self.storage_bits or not isinstance(calib, Calibration):
            return compute()
        key = (self.model_name, tuple(self.linears), calib.key)
        store = _SHARED.get(self.bundle.model)
        if store is None or store["key"] != key:
            store = _SHARED[self.bundle.model] = {"key": key, "items": {}, "bytes": 0}
        if item not in store["items"]:
            value = compute()
            size = sum(tensor_bytes(t) for t in {id(t): t for t in value.values()}.values())
            if store["bytes"] + size > SHARED_BYTES:
                return value
            store["items"][item], store["bytes"] = value, store["bytes"] + size
        return store["items"][item]

    def _collect_inputs(self, names: list[str], calib, max_tokens: int) -> dict[str, torch.Tensor]:
        chunks: dict[str, list[torch.Tensor]] = {}
        share: dict[str, str] = {}

        def on_input(name, key, x):
            share[name] = key
            if key == name:
                chunks.setdefault(key, []).append(x)

        self._forward_with_hooks(names, calib, on_input)
        merged = {}
        for key, xs in chunks.items():
            x = torch.cat(xs)
            merged[key] = x[torch.linspace(0, x.shape[0] - 1, min(max_tokens, x.shape[0])).long()]
        return {n: merged[share[n]] for n in names}

    def input_absmax(self, calib) -> dict[str, torch.Tensor]:
        """max |x| per input channel of every target linear over the calibration set, block by
        block on the current weights (``(in_features,)`` each)."""
        out: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            def on_input(name, key, x):
                m = x.abs().amax(0)
                out[name] = torch.maximum(out[name], m) if name in out else m
            self._forward_with_hooks(block, calib, on_input)
        self._carry = {}
        return out

    def gradients(self, calib) -> dict[str, torch.Tensor]:
        """Mean gradient of the calibration language-modelling loss w.r.t. each target weight; on the
        full-precision model (``shared``)."""
        return self._shared(("gradients",), calib, lambda: self._gradients(calib))

    def _gradients(self, calib) -> dict[str, torch.Tensor]:
        model = self.bundle.model
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for m in self.linears.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
        try:
            with torch.enable_grad():
                for s in calib:
                    ids = s.input_ids
                    labels = ids.clone()
                    if self.bundle.image_token_id is not None:
                        labels[ids == self.bundle.image_token_id] = -100
                    kw = dict(s.extra or {})
                    if s.pixel_values is not None:
                        kw["pixel_values"] = s.pixel_values
                    loss = model(input_ids=ids, labels=labels, **kw).loss / len(calib)
                    loss.backward()
            return {n: m.weight.grad.detach().float().clone() for n, m in self.linears.items()}
        finally:
            for m in self.linears.values():
                m.weight.grad = None
            for p, f in flags.items():
                p.requires_grad_(f)

    # --- results -------------------------------------------------------------------------
    def set(self, name: str, weight: torch.Tensor, storage_bits: float, outliers: int = 0) -> None:
        """Write the quantized weight into the model now and book its storage."""
        mod = self.linears[name]
        mod.weight = torch.nn.Parameter(weight.to(self._original[name].dtype).contiguous(), requires_grad=False)
        self.storage_bits[name] = storage_bits
        self.outliers += outliers

    def note(self, name: str, **info) -> None:
        self.notes.setdefault(name, {}).update(info)

    def restore(self) -> dict[str, torch.Tensor]:
        done = {n: self.linears[n].weight.data for n in self.storage_bits}
        for n, m in self.linears.items():
            m.weight = self._original[n]
        return done


# --- applying a method ------------------------------------------------------------------------
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
CACHE_SIZE = 2  # quantized weight sets kept per model (each is a model-sized copy of the linears)
# Weights are computed on this many threads whatever a sweep offers (None: as set): GPTQ's 3-bit
# smollm2 perplexity is 64.75 on one thread and 64.90 on two, from last-bit BLAS differences.
CALIBRATION_THREADS: int | None = 1


def quantized_weights(bundle, method) -> QuantizedWeights:
    """The method's de-quantized weights for this model, computed once and cached."""
    state = _STATE.setdefault(bundle.model, {"cache": OrderedDict(), "active": None})
    key = str(method)
    if key in state["cache"]:
        state["cache"].move_to_end(key)
        return state["cache"][key]
    method.validate(None)
    t = time.perf_counter()
    wctx = WeightContext(bundle, method.targets)
    try:
        if wctx.linears:  # no_grad: methods that need gradients (MixLLM) enable them in wctx.gradients
            with torch.no_grad(), pinned(CALIBRATION_THREADS):
                method.for_model(wctx).quantize_weights(wctx)
    finally:
        weights = wctx.restore()
    # everything the model holds except the (restored, full-precision) weights that were quantized
    other = model_bytes(bundle.model) - sum(tensor_bytes(wctx.linears[n].weight) for n in weights)
    qw = QuantizedWeights(key, weights, wctx.storage_bits, {n: w.numel() for n, w in weights.items()}, other,
                          wctx.outliers, wctx.notes, time.perf_counter() - t)
    state["cache"][key] = qw
    while len(state["cache"]) > CACHE_SIZE:
        state["cache"].popitem(last=False)
    return qw


@contextlib.contextmanager
def applied(bundle, methods):
    """Swap the run's weight quantization in and hook its activation quantization (at the input of
    every target linear) for the ``with`` body; yields the QuantizedWeights (None without a weight
    method). One weight method and one activation quantizer per run; they compose (e.g. GPTQ
    weights with 4-bit activations), and a method that does both (``act_quant``) is both."""
    wq = [m for m in methods if m.quantizes_weights]
    aq = [m for m in methods if m.quantizes_activations()]
    if len(wq) > 1:
        raise MethodError(f"one weight quantization method per run, got {', '.join(m.name for m in wq)}")
    if len(aq) > 1:
        raise MethodError(f"one activation quantization method per run, got {', '.join(m.name for m in aq)}")
    states = activation_states(bundle, aq[0]) if aq else None  # calibrated before any weight is swapped
    with _weights(bundle, wq[0] if wq else None) as qw, _activations(bundle, aq[0] if aq else None, states):
        yield qw


def activation_states(bundle, method) -> dict:
    """The activation quantizer's per-linear calibration (``calibrate_activations``) on the
    full-precision model, computed once per (model, method) and cached."""
    if type(method).calibrate_activations is Method.calibrate_activations:
        return {}
    state = _STATE.setdefault(bundle.model, {"cache": OrderedDict(), "active": None})
    key = f"activations:{method}"
    if key not in state:
        if state["active"] is not None:
            raise MethodError(f"{method.name} calibrates on the full-precision model; enter it before the "
                              f"weights of {bundle.name} are swapped")
        method.validate(None)
        wctx = WeightContext(bundle, method.targets)
        with torch.no_grad(), pinned(CALIBRATION_THREADS):
            state[key] = method.calibrate_activations(wctx)
    return state[key]


@contextlib.contextmanager
def _weights(bundle, method):
    if method is None:
        yield None
        return
    state = _STATE.setdefault(bundle.model, {"cache": OrderedDict(), "active": None})
    if state["active"] is not None:
        if state["active"].method == str(method):  # nested entry (run inside evaluate): already in place
            yield state["active"]
            return
        raise MethodError(f"weights of {bundle.name} are already quantized by {state['active'].method}")
    qw = quantized_weights(bundle, method)
    modules = dict(bundle.model.named_modules())
    originals = {n: modules[n].weight for n in qw.weights}
    try:
        for n, w in qw.weights.items():
            modules[n].weight = torch.nn.Parameter(w, requires_grad=False)
        state["active"] = qw
        set_active_weights(bundle.model, qw.method)
        yield qw
    finally:
        state["active"] = None
        set_active_weights(bundle.model, None)
        for n, w in originals.items():
            modules[n].weight = w


@contextlib.contextmanager
def _activations(bundle, method, states=None):
    if method is None or active_activations(bundle.model) == str(method):  # none, or nested entry
        yield
        return
    if active_activations(bundle.model) is not None:
        raise MethodError(f"activations of {bundle.name} are already quantized by {active_activations(bundle.model)}")
    method.validate(None)
    states = states or {}

    def hook(name):
        s = states.get(name)
        return lambda m, args: (method.quantize_activation(args[0], s),) + tuple(args[1:])
    hooks = [lin.register_forward_pre_hook(hook(n)) for n, lin in target_linears(bundle, method.targets).items()]
    set_active_activations(bundle.model, str(method))
    try:
        yield
    finally:
        set_active_activations(bundle.model, None)
        for h in hooks:
            h.remove()


# --- real kernels (torchao) --------------------------------------------------------------------
TORCHAO_SCHEMES = ("int8_weight", "int8_dynamic", "intx_weight")


def _torchao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it logs every GPU-only extension it cannot load
    import torchao.quantization as tq

    return tq


def torchao_config(scheme: str, bits: int = 4, group_size: int | None = 32, sym: bool = True):
    """The torchao config for ``scheme``: "int8_weight" (Int8WeightOnlyConfig), "int8_dynamic"
    (Int8DynamicActivationInt8WeightConfig: int8 per-token activations x int8 per-channel weights)
    or "intx_weight" (IntxWeightOnlyConfig at ``bits``/``group_size``, symmetric or not)."""
    tq = _torchao()
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if scheme == "int8_weight":
        return tq.Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if scheme == "intx_weight":
        if not 1 <= bits <= 8:
            raise MethodError(f"intx_weight: bits must be in 1..8, got {bits!r}")
        return tq.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                       granularity=PerAxis(0) if group_size is None else PerGroup(group_size),
                                       mapping_type=MappingType.SYMMETRIC if sym else MappingType.ASYMMETRIC)
    raise MethodError(f"unknown torchao scheme {scheme!r}; valid: {', '.join(TORCHAO_SCHEMES)}")


def torchao_quantize(bundle, scheme: str, *, bits: int = 4, group_size: int | None = 32, sym: bool = True,
                     targets: str = "llm"):
    """A copy of ``bundle`` whose target linears hold torchao's quantized tensors (real kernels)."""
    cfg = torchao_config(scheme, bits, group_size, sym)
    names = set(target_linears(bundle, targets))
    model = copy.deepcopy(bundle.model)
    tq = _torchao()
    tq.quantize_(model, cfg, filter_fn=lambda mod, fqn: fqn in names)
    label = scheme if scheme != "intx_weight" else f"int{bits}_weight_g{group_size or 'ch'}"
    return bundle.with_model(model, f"{bundle.name}+torchao:{label}")
