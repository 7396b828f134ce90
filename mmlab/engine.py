"""The engine: one explicit prefill / decode loop over Hugging Face decoder layers.

    sample -> vision tower + projector -> image features       [stage image_features]
           -> assemble inputs_embeds + modality map
           -> for each decoder layer i:                          [stage before_layer(i)]
                  run layer i on the live tokens (own positions, own KV length)
           -> final norm + LM head                               [stage after_prefill(cache)]
           -> greedy decode, one token at a time                 [stage decode_step]
                  each layer on the new token                     [stage decode_layer(i)]
           -> Trace

Tokens removed by a method are physically gone from every later layer (and from those
layers' KV cache); nothing is masked, except where a method asks for a different attention
pattern itself (``Tokens.restrict``, YOPO), which the Trace counts apart (``Trace.restricted``).
Positions are carried with the tokens, so a token keeps its RoPE position when others are
dropped; decoding continues from the last prompt token's position + 1. One sample at a time (batch size 1).

The engine sees a model only through its adapter (``mmlab.arch``) and methods only through
their stages (``mmlab.methods.base``). Weight quantization is swapped in *around* it
(``mmlab.quantize.applied``, entered by ``mmlab.run``); the engine only checks it is in place.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from mmlab.arch import Adapter
from mmlab.methods.base import Method, MethodError, needs_swap
from mmlab.models import active_activations, active_weights
from mmlab.threads import follow as follow_threads
from mmlab.trace import Trace

SCORE_CHUNK_BYTES = 64 * 2**20  # the largest block of heads x rows x keys float32 scores held at once


class KVCache:
    """Per-layer key/value tensors; each layer may hold a different number of tokens.

    Implements the one method Hugging Face attention modules call (``update``), so the
    stock decoder layers read and write it directly.
    """

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        # a quantized prefix per layer (KV quantization): it precedes keys[i] / values[i]
        self.quantized: list = [None] * n_layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        if self.quantized[layer_idx] is not None:  # de-quantized on the fly; only the codes stay held
            qk, qv = self.quantized[layer_idx].dequantize()
            k, v = self.keys[layer_idx], self.values[layer_idx]
            return (k if qk is None else torch.cat([qk, k], -2)), (v if qv is None else torch.cat([qv, v], -2))
        return self.keys[layer_idx], self.values[layer_idx]

    def lengths(self) -> list[int]:
        return [(0 if k is None else int(k.shape[-2])) + (0 if q is None else q.length)
                for k, q in zip(self.keys, self.quantized)]

    def nbytes(self) -> int:
        """Bytes of the tensors actually held (a method may store compressed tensors)."""
        return (sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
                + sum(q.nbytes() for q in self.quantized if q is not None))


@dataclass
class Tokens:
    """The live prefill sequence: what the next decoder layer will see."""

    hidden: torch.Tensor  # (1, n, d)
    positions: torch.Tensor  # (1, n) or (3, 1, n) for M-RoPE; RoPE position of each token
    source: torch.Tensor  # (n,) index of each token in the assembled prompt
    is_image: torch.Tensor  # (n,) bool
    routed: torch.Tensor | None = None  # set by route(): the tokens the next layer processes
    weights: torch.Tensor | None = None  # set by route(): per-token router weights (p-MoD's STRing)
    allowed: torch.Tensor | None = None  # set by restrict(): (1 | heads, n, n) bool, who attends to whom
    head_gate: torch.Tensor | None = None  # set by restrict(): (n, heads) factor on each head's output

    def restrict(self, allowed: torch.Tensor, head_gate: torch.Tensor | None = None) -> None:
        """The *next* layer's attention pattern, in place of the causal rule: ``allowed`` (1 or heads, n, n)
        bool, True where query row i may attend to key j (the layer's sliding window still applies);
        ``head_gate`` (n, heads) multiplies each head's attention output of each token before the output
        projection (0: the head is cut for that token). A mask, not a removal: the tokens are all still
        computed, the Trace counts the allowed pairs and gated rows apart (``Trace.restricted``)."""
        n = len(self)
        if allowed.dtype != torch.bool or allowed.dim() != 3 or allowed.shape[1:] != (n, n):
            raise MethodError(f"restrict(): allowed must be a (1 or heads, {n}, {n}) bool tensor, "
                              f"got {tuple(allowed.shape)} {allowed.dtype}")
        if not allowed.any(-1).all():
            raise MethodError("restrict(): every query row must be allowed at least one key (itself)")
        if head_gate is not None and (head_gate.dim() != 2 or head_gate.shape[0] != n):
            raise MethodError(f"restrict(): head_gate must be (n={n}, heads), got {tuple(head_gate.shape)}")
        if self.routed is not None:
            raise MethodError("restrict() and route() in the same layer are not supported")
        self.allowed, self.head_gate = allowed, head_gate

    def __len__(self) -> int:
        return self.hidden.shape[1]

    def route(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Mixture-of-Depths: only ``indices`` go through the *next* layer (attention + MLP, and
        only they write its KV); the others pass it unchanged on the residual stream and stay
        for the layers after. With ``weights`` (n,), the layer computes x + attn + w * mlp for
        routed tokens and w * x for skipped ones (p-MoD's STRing reweighting)."""
        if self.allowed is not None:
            raise MethodError("restrict() and route() in the same layer are not supported")
        self.routed, self.weights = self._subset(indices, "route"), weights

    def _subset(self, indices, what: str) -> torch.Tensor:
        idx = torch.as_tensor(indices, device=self.hidden.device).long().sort().values
        if idx.numel() == 0 or idx[-1] >= len(self) or idx[0] < 0:
            raise MethodError(f"{what}(): indices must be a non-empty subset of 0..{len(self) - 1}")
        return idx

    def keep(self, indices: torch.Tensor, merged_into: torch.Tensor | None = None, reduce: str = "mean") -> None:
        """Keep only ``indices`` (into the current sequence) from now on; order is preserved. With
        ``merged_into`` (n,): for every current token, the kept token it is pooled into (-1: none); a
        kept token that receives tokens becomes their ``reduce`` ("mean" or "amax", elementwise):
        SparseVLM's recycling, DPN's pooling."""
        idx = self._subset(indices, "keep")
        if self.routed is not None or self.allowed is not None:
            raise MethodError("keep() after route() / restrict() in the same layer: prune first, then route or "
                              "restrict")
        if merged_into is not None:
            self.hidden = self._merged(idx, torch.as_tensor(merged_into, device=self.hidden.device).long(), reduce)
        self.hidden = self.hidden.index_select(1, idx)
        self.positions = self.positions.index_select(-1, idx)
        self.source = self.source.index_select(0, idx)
        self.is_image = self.is_image.index_select(0, idx)

    def _merged(self, idx: torch.Tensor, into: torch.Tensor, reduce: str) -> torch.Tensor:
        """The hidden states with every token that receives merges replaced by the reduction of its group."""
        n = len(self)
        if into.shape != (n,) or into.max() >= n or into.min() < -1 or not torch.isin(into[into >= 0], idx).all():
            raise MethodError(f"keep(merged_into=...): need one entry per token ({n}), each -1 or a kept index")
        if reduce not in ("mean", "amax"):
            raise MethodError(f"keep(reduce={reduce!r}): reduce must be 'mean' or 'amax'")
        src = torch.nonzero(into >= 0).flatten()
        out = self.hidden[0].float()  # (n, d), reduced in float32
        out = out.scatter_reduce(0, into[src, None].expand(-1, out.shape[1]), out[src], reduce, include_self=False)
        return out.to(self.hidden.dtype)[None]


@dataclass
class Context:
    """What methods see of the run (see ``mmlab.methods.base.RunContext`` for the contract)."""

    model_name: str
    config: object  # the decoder's config
    n_layers: int
    has_image: bool
    trace: Trace
    adapter: Adapter
    sample_index: int = 0
    n_image_tokens: int = 0
    image_grid: tuple[int, int] | None = None  # (rows, cols) of one image's tokens, where they form a grid
    extras: dict = field(default_factory=dict)  # what a checkpoint carries besides weights (e.g. MoD routers)
    scratch: dict = field(default_factory=dict)
    method: str | None = None  # the method whose stage is running (named in errors)
    _layer_inputs: dict = field(default_factory=dict)  # layer -> (hidden_in, (cos, sin), keys) kept on demand
    _restrictions: dict = field(default_factory=dict)  # layer -> the (1 | heads, n, n) pattern restrict() set
    _scores: dict = field(default_factory=dict)  # memoised score reductions, shared by forks of one prefill
    _rope: tuple | None = None  # (positions, rotary key, (cos, sin)) of the last layer run
    _inputs: object = None  # the encoded sample (for the vision tower's states, on demand)

    def vision_states(self, image: int):
        """Image ``image`` in the vision tower's feature layer before the projector (CLS first), its
        [CLS] attention and keys (``Adapter.vision_states``), computed once per run on demand."""
        if "_vision_states" not in self.scratch:
            self.scratch["_vision_states"] = self.adapter.vision_states(self._inputs)
        return self.scratch["_vision_states"][image]

    def project(self, states):
        """The model's projector on tower states: visual tokens in the LLM's space."""
        return self.adapter.project(states)

    def record_image_selection(self, image: int, kept: torch.Tensor, merged_into: torch.Tensor | None = None) -> None:
        self.trace.image_kept[image] = kept.detach().cpu()
        if merged_into is not None:
            self.trace.image_merged_into[image] = merged_into.detach().cpu()

    def cache_is_image(self, layer: int) -> torch.Tensor:
        """(len,) bool: which of layer ``layer``'s cached prompt tokens are visual tokens."""
        device = next(self.adapter.layers[layer].parameters()).device  # where that layer's scores live
        return (self.trace.modality[self.trace.layer_tokens[layer]] >= 0).to(device)

    def attention_logits(self, layer: int, queries: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Pre-softmax attention scores ``(heads, q, k)`` of prefill layer ``layer`` (masked: -inf).

        Recomputed by the model's adapter for the requested query rows only, from the layer's
        input and its KV cache: the model itself stays on SDPA. Available for the previous layer
        inside ``before_layer``, for layers listed in ``run(attention_layers=...)``, and for every
        layer in ``after_prefill`` when a method of the run sets ``prefill_attention``.
        """
        if layer not in self._layer_inputs:
            raise MethodError(f"attention of layer {layer} is not available here; "
                              f"only the previous layer's (or layers requested with attention_layers=)")
        self.adapter.check_attention(layer, self.method)
        hidden, pe, keys = self._layer_inputs[layer]
        rows = torch.arange(hidden.shape[1], device=hidden.device)
        rows = rows[queries if queries is not None else slice(None)].reshape(-1)
        allowed = self._restrictions.get(layer)
        return self.adapter.attention_logits(layer, hidden, pe, keys, rows,
                                             None if allowed is None else allowed[:, rows])

    def attention(self, layer: int, queries: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Softmax attention probabilities ``(heads, q, k)`` of prefill layer ``layer`` (see ``attention_logits``)."""
        p = self.attention_logits(layer, queries)
        p -= p.amax(-1, keepdim=True)  # softmax in place (no second heads x q x k buffer)
        p.exp_()
        return p.div_(p.sum(-1, keepdim=True))

    def attention_received(self, layer: int) -> torch.Tensor:
        """``(heads, k)``: the attention each key of prefill layer ``layer`` receives, summed over every
        query (H2O's accumulated attention). Computed over query rows in chunks of at most
        ``SCORE_CHUNK_BYTES`` of scores, so a long prompt never holds a heads x n x n map, and memoised:
        every method and every fork of this prefill that asks again reads it back."""
        key = ("received", layer)
        if key not in self._scores:
            n = self._layer_inputs[layer][0].shape[1] if layer in self._layer_inputs else 1  # else: raises below
            rows = max(1, SCORE_CHUNK_BYTES // (4 * self.config.num_attention_heads * n))
            total = self.attention(layer, slice(0, rows)).sum(1)
            for start in range(rows, n, rows):
                total += self.attention(layer, slice(start, start + rows)).sum(1)
            self._scores[key] = total
        return self._scores[key]


@dataclass
class Prefill:
    """A prefill: its Trace so far, the (possibly compressed) cache and where decoding resumes."""

    trace: Trace
    cache: KVCache
    ctx: Context
    logits: torch.Tensor  # (1 or L, vocab)
    next_position: torch.Tensor  # RoPE position of the first generated token
    stage_ms: dict = field(default_factory=dict)  # time spent in each stage so far
    dense_ms: float = 0.0  # wall-clock up to the after_prefill stage
    max_new_tokens: int | None = None  # the sample's own answer length limit

    def fork(self, methods: list[Method]) -> "Prefill":
        """An independent copy of a prefill not yet compressed, to compress with ``methods``: the
        cache's per-layer lists and the Trace's records are copied (methods replace cache tensors,
        never write into them); the layer inputs and memoised scores are shared."""
        if any(q is not None for q in self.cache.quantized) or self.trace.kv_lengths_prefill:
            raise MethodError("fork() takes a prefill before its after_prefill stage")
        cache = KVCache(len(self.cache.keys))
        cache.keys, cache.values = list(self.cache.keys), list(self.cache.values)
        trace = dataclasses.replace(self.trace, methods=[str(m) for m in methods],
                                    extra=copy.deepcopy(self.trace.extra), timings=dict(self.trace.timings),
                                    attentions=dict(self.trace.attentions), step_logits=[], decode_kv_lengths=[],
                                    answer_ids=[])
        ctx = dataclasses.replace(self.ctx, trace=trace, scratch={}, method=None)
        for m in methods:
            m.validate(ctx)
        return dataclasses.replace(self, trace=trace, cache=cache, ctx=ctx, stage_ms=dict(self.stage_ms))


# --- checks before a run -------------------------------------------------------------------
def check_methods(bundle, methods: list[Method]) -> None:
    """Order rules and the weight swap, before any work."""
    for i, m in enumerate(methods):
        later = [o.name for o in methods[i + 1:] if type(o).after_prefill is not Method.after_prefill]
        if m.quantizes_cache and later:
            raise MethodError(f"{m.name} quantizes the KV cache, so it must come after the KV methods it composes "
                              f"with ({', '.join(later)}): list it last")
        if m.quantizes_weights and active_weights(bundle.model) != str(m):
            raise MethodError(f"{m.name} quantizes weights, which are swapped in around the engine: call "
                              f"mmlab.run / mmlab.prefill / mmlab.evaluate, not mmlab.engine directly")
        if m.quantizes_activations() and active_activations(bundle.model) != str(m):
            raise MethodError(f"{m.name} quantizes activations, hooked in around the engine: call "
                              f"mmlab.run / mmlab.prefill / mmlab.evaluate, not mmlab.engine directly")


def _call_stage(ctx: Context, method: Method, stage: str, totals: dict, *args):
    ctx.method = method.name
    t = time.perf_counter()
    out = getattr(method, stage)(ctx, *args)
    totals["method_ms"] = totals.get("method_ms", 0.0) + (time.perf_counter() - t) * 1e3
    ctx.method = None
    return out


def _call_layer(layer, hidden, positions, pe, cache, mask=None):
    # M-RoPE positions (3, 1, n) live in ``pe`` only; the layer takes 1-D text positions
    out = layer(hidden, attention_mask=mask, position_ids=positions if positions.dim() == 2 else None,
                past_key_values=cache, use_cache=True, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


# --- prefill --------------------------------------------------------------------------------
def prefill(bundle, sample, methods: list[Method] | tuple = (), *, attention_layers=(), all_logits: bool = False,
            sample_index: int = 0) -> Prefill:
    """Vision tower, image-feature methods, the layer loop with ``before_layer``, then ``after_prefill``."""
    methods = list(methods)
    # KV methods score the whole prefill after it ends: keep every layer's attention inputs until then
    p = dense_prefill(bundle, sample, methods, attention_layers=attention_layers, all_logits=all_logits,
                      sample_index=sample_index, keep_inputs=any(m.prefill_attention for m in methods))
    compress(p, methods)
    p.ctx._layer_inputs.clear()
    p.ctx._restrictions.clear()
    return p


def dense_prefill(bundle, sample, methods: list[Method], *, attention_layers=(), all_logits: bool = False,
                  sample_index: int = 0, keep_inputs: bool = False) -> Prefill:
    """Everything before the after_prefill stage: vision tower, image features, the layer loop with
    ``before_layer``, and the logits. ``keep_inputs`` keeps every layer's attention inputs for scoring."""
    check_methods(bundle, methods)
    follow_threads()
    inputs = sample if hasattr(sample, "input_ids") else bundle.encode(sample)
    ctx = _context(bundle, inputs, methods, attention_layers, sample_index)
    stage_ms: dict[str, float] = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        tokens = _prompt(bundle, inputs, methods, ctx, stage_ms)
        cache = KVCache(ctx.n_layers)
        for i in range(ctx.n_layers):
            for m in methods:
                _call_stage(ctx, m, "before_layer", stage_ms, i, tokens)
            if not keep_inputs:
                ctx._layer_inputs.pop(i - 2, None)  # scores stay available one layer back only
                ctx._restrictions.pop(i - 2, None)
            _prefill_layer(bundle.adapter, i, tokens, cache, ctx)
            if i in attention_layers:
                ctx.trace.attentions[i] = ctx.attention(i).cpu()
        logits = bundle.adapter.logits(tokens.hidden if all_logits else tokens.hidden[:, -1:])
        if not keep_inputs:
            ctx._layer_inputs.clear()
            ctx._restrictions.clear()
    ctx.trace.logits = logits[-1].cpu()
    if all_logits:
        ctx.trace.all_logits = logits.cpu()
    # decoding continues from the last prompt token's position, whatever was dropped before it
    return Prefill(ctx.trace, cache, ctx, logits, tokens.positions[..., -1:] + 1, stage_ms,
                   (time.perf_counter() - t0) * 1e3, inputs.max_new_tokens)


def compress(p: Prefill, methods: list[Method]) -> None:
    """The after_prefill stage (KV eviction / merging / quantization) and the prefill's final records:
    cache lengths and bytes, and ``prefill_ms`` = the dense prefill's time + this compression's."""
    trace, t0 = p.trace, time.perf_counter()
    trace.kv_lengths_prefill = p.cache.lengths()
    with torch.inference_mode():
        for m in methods:
            _call_stage(p.ctx, m, "after_prefill", p.stage_ms, p.cache)
    trace.kv_lengths_final = p.cache.lengths()
    trace.kv_bytes = p.cache.nbytes()
    trace.timings["prefill_ms"] = p.dense_ms + (time.perf_counter() - t0) * 1e3
    trace.timings.update(p.stage_ms)


def _context(bundle, inputs, methods, attention_layers, sample_index) -> Context:
    adapter = bundle.adapter
    n_layers = len(adapter.layers)
    trace = Trace(methods=[str(m) for m in methods], dims=adapter.dims())
    ctx = Context(bundle.name, adapter.decoder.config, n_layers, inputs.pixel_values is not None, trace, adapter,
                  sample_index=sample_index, extras=bundle.extras)
    bad = [a for a in attention_layers if not 0 <= a < n_layers]
    if bad:
        raise MethodError(f"attention_layers {bad} out of range; this model has layers 0..{n_layers - 1}")
    ctx.image_grid = trace.image_grid = adapter.image_grid(inputs) if ctx.has_image else None
    for m in methods:
        m.validate(ctx)
    return ctx


def _prompt(bundle, inputs, methods, ctx: Context, stage_ms: dict) -> Tokens:
    """Vision tower + projector, the image_features stage, and the assembled prompt."""
    t = time.perf_counter()
    feats = bundle.adapter.image_features(inputs)
    stage_ms["vision_ms"] = (time.perf_counter() - t) * 1e3
    ctx._inputs = inputs
    ctx.trace.n_image_tokens_in = sum(f.shape[0] for f in feats)
    for m in methods:
        feats = _call_stage(ctx, m, "image_features", stage_ms, feats)
    prompt = bundle.adapter.assemble(inputs, feats, ctx.trace.image_kept)
    ctx.trace.modality = prompt.modality
    is_image = prompt.modality.to(prompt.source.device)[prompt.source] >= 0
    ctx.n_image_tokens = int(is_image.sum())
    return Tokens(prompt.embeds, prompt.positions, prompt.source, is_image)


def _prefill_layer(adapter, i: int, tokens: Tokens, cache: KVCache, ctx: Context) -> None:
    """Decoder layer ``i`` on the live tokens (only the routed ones when a method routed)."""
    routed, weights, tokens.routed, tokens.weights = tokens.routed, tokens.weights, None, None
    sel = slice(None) if routed is None else routed
    ctx.trace.layer_tokens.append(tokens.source[sel])
    hidden_in, positions = tokens.hidden[:, sel], tokens.positions[..., sel]
    pe = _rotary(adapter, ctx, hidden_in, positions if routed is not None else tokens.positions, i)
    mask = (adapter.attention_mask(i, 0, hidden_in.shape[1]) if tokens.allowed is None
            else _restricted(adapter, ctx, i, tokens))  # a method's own pattern for this layer
    with _gated(adapter, i, tokens.head_gate):
        if weights is None:
            out = _call_layer(adapter.layers[i], hidden_in, positions, pe, cache, mask)
        else:
            out = adapter.weighted_layer(i, hidden_in, positions, pe, cache, weights[sel], mask)
    tokens.allowed = tokens.head_gate = None
    if routed is None:
        tokens.hidden = out
    else:  # skipped tokens ride the residual stream (scaled by their weight under STRing)
        skipped = tokens.hidden if weights is None else tokens.hidden * weights[None, :, None].to(out.dtype)
        tokens.hidden = skipped.index_copy(1, routed, out)
    ctx._layer_inputs[i] = (hidden_in, pe, cache.keys[i])


def _restricted(adapter, ctx: Context, i: int, tokens: Tokens) -> torch.Tensor:
    """Layer i's mask under ``tokens.restrict``: the method's pattern (and the layer's sliding window);
    the Trace records the allowed (query, key) pairs and the gated rows, per head on average."""
    allowed, gate, n = tokens.allowed, tokens.head_gate, len(tokens)
    q, k = torch.arange(n, device=allowed.device)[:, None], torch.arange(n, device=allowed.device)[None, :]
    own = k <= q  # the layer's own pattern: causal, within its sliding window
    window = adapter.sliding_window(i)
    if window is not None:
        allowed, own = allowed & (q - k < window), own & (q - k < window)
    ctx._restrictions[i] = allowed
    heads = ctx.config.num_attention_heads
    ctx.trace.restricted[i] = {"pairs": float(allowed.sum()) / allowed.shape[0], "own_pairs": float(own.sum()),
                               "gated": 0.0 if gate is None else float((gate == 0).sum()) / heads}
    return allowed[None]


@contextlib.contextmanager
def _gated(adapter, i: int, gate: torch.Tensor | None):
    """Multiply each head's slice of layer i's output projection input by ``gate`` (n, heads) while inside."""
    if gate is None:
        yield
        return

    def hook(module, args):
        x = args[0]  # (1, n, heads * head_dim)
        g = gate.to(x.dtype)
        return (x.view(*x.shape[:2], g.shape[1], -1).mul(g[None, :, :, None]).view(x.shape), *args[1:])

    handle = adapter.attention_output(i).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _rotary(adapter, ctx: Context, hidden, positions, i: int):
    """Layer i's (cos, sin), reused from the previous layer while the live positions and the rotary
    table are the same (no token removed or routed since)."""
    key = adapter.rotary_key(i)
    if ctx._rope is None or ctx._rope[0] is not positions or ctx._rope[1] != key:
        ctx._rope = (positions, key, adapter.rotary(hidden, positions, i))
    return ctx._rope[2]


# --- decode -------------------------------------------------------------------------------------
def run(bundle, sample, methods: list[Method] | tuple = (), *, max_new_tokens: int | None = None,
        attention_layers: tuple[int, ...] | list[int] = (), all_logits: bool = False,
        sample_index: int = 0) -> Trace:
    """Prefill + greedy decode of one sample under ``methods``; returns the Trace.

    A sample encoded with a ``context_len`` (``query_after=True``) is prefilled up to it, the
    methods compress that context, then the question's tokens are fed over the compressed
    cache (counted like decode tokens in the Trace) before generation starts.
    """
    methods = list(methods)
    inputs, query = _split_query(bundle, sample)
    p = prefill(bundle, inputs, methods, attention_layers=attention_layers, all_logits=all_logits,
                sample_index=sample_index)
    return _answer(bundle, p, methods, query, max_new_tokens)


def shares_prefill(methods: list[Method]) -> bool:
    """True when every method acts only once the prefill is done (KV eviction / merging / quantization):
    its dense prefill is then the same as with no method, and ``run_many`` can share it."""
    return all(type(m).image_features is Method.image_features and type(m).before_layer is Method.before_layer
               and not needs_swap(m) for m in methods)


def prefills(bundle, inputs, method_lists: list, *, all_logits: bool = False, sample_index: int = 0):
    """``prefill`` of one input under each of several method lists, yielded one at a time (each is
    used before the next is made). When every method acts only after the prefill (``shares_prefill``)
    the dense prefill is computed once and each list compresses its own fork of it, with scores
    memoised across them; otherwise each list prefills on its own. A list that a method refuses on
    this input yields its ``MethodError`` in place of a Prefill."""
    lists = [list(ms) for ms in method_lists]
    if not all(shares_prefill(ms) for ms in lists):
        for ms in lists:
            try:
                yield prefill(bundle, inputs, ms, all_logits=all_logits, sample_index=sample_index)
            except MethodError as e:
                yield e
        return
    base = dense_prefill(bundle, inputs, [], all_logits=all_logits, sample_index=sample_index,
                         keep_inputs=any(m.prefill_attention for ms in lists for m in ms))
    try:
        for ms in lists:
            try:
                check_methods(bundle, ms)
                p = base.fork(ms)
                compress(p, ms)
            except MethodError as e:
                yield e
                continue
            p.ctx._layer_inputs = {}  # the shared inputs stay with the base until every list is done
            yield p
    finally:
        base.ctx._layer_inputs.clear()


def run_many(bundle, sample, method_lists: list, *, max_new_tokens: int | None = None,
             sample_index: int = 0) -> list[Trace | MethodError]:
    """``run`` of one sample under each of several method lists, sharing one dense prefill where the
    methods allow it (``prefills``); a refused list gets its ``MethodError`` in place of a Trace."""
    lists = [list(ms) for ms in method_lists]
    inputs, query = _split_query(bundle, sample)
    return [p if isinstance(p, MethodError) else _answer(bundle, p, ms, query, max_new_tokens)
            for p, ms in zip(prefills(bundle, inputs, lists, sample_index=sample_index), lists)]


def _split_query(bundle, sample):
    """(the inputs to prefill, the question's ids fed after compression or None)."""
    inputs = sample if hasattr(sample, "input_ids") else bundle.encode(sample)
    if inputs.context_len is None:
        return inputs, None
    query = inputs.input_ids[:, inputs.context_len:]
    return dataclasses.replace(inputs, input_ids=inputs.input_ids[:, :inputs.context_len], context_len=None), query


def _answer(bundle, p: Prefill, methods, query, max_new_tokens) -> Trace:
    """The question (if it comes after compression), then greedy decoding; returns the finished Trace."""
    logits, next_pos = p.logits[-1], p.next_position
    if query is not None and query.shape[1]:
        logits, next_pos = _feed_query(bundle, p, query)
    limit = next(n for n in (max_new_tokens, p.max_new_tokens, bundle.max_new_tokens) if n is not None)
    _generate(bundle, p, methods, logits, next_pos, limit)
    return p.trace


def _feed_query(bundle, p: Prefill, query: torch.Tensor):
    """The question's tokens over the compressed context cache; returns its last logits and the next position."""
    t, lengths = time.perf_counter(), p.cache.lengths()
    logits = extend(bundle, p.cache, query, p.next_position)[-1]
    p.trace.decode_kv_lengths += [[n + j + 1 for n in lengths] for j in range(query.shape[1])]
    p.trace.timings["query_ms"] = (time.perf_counter() - t) * 1e3
    p.trace.extra["query_tokens"] = query.shape[1]
    p.trace.logits = logits.cpu()
    return logits, p.next_position + query.shape[1]


def _generate(bundle, p: Prefill, methods, logits: torch.Tensor, next_pos: torch.Tensor, max_new: int) -> None:
    """Greedy decoding until a stop token or ``max_new`` tokens; fills the Trace's answer and timings."""
    ids, step_ms, stop = [], [], bundle.stop_ids
    token = int(logits.argmax())
    with torch.inference_mode():
        for step in range(max_new):
            if token in stop:
                break
            ids.append(token)
            if step == max_new - 1:
                break
            t = time.perf_counter()
            logits = _decode_step(bundle.adapter, p, methods, step, token, next_pos)
            p.trace.step_logits.append(logits.cpu())
            token = int(logits.argmax())
            next_pos = next_pos + 1
            step_ms.append((time.perf_counter() - t) * 1e3)
    p.trace.answer_ids = ids
    p.trace.answer = bundle.decode(ids)
    p.trace.kv_bytes_final = p.cache.nbytes()
    if step_ms:
        p.trace.timings["decode_ms_per_token"] = float(torch.tensor(step_ms).median())


def _decode_step(adapter, p: Prefill, methods, step: int, token: int, position: torch.Tensor) -> torch.Tensor:
    """One decode step: the ``decode_step`` stages, then ``token`` at ``position`` through every layer after
    the cache (``decode_layer`` stages inside); its (vocab,) logits."""
    for m in methods:
        m.decode_step(p.ctx, step, p.cache)
    p.trace.decode_kv_lengths.append([n + 1 for n in p.cache.lengths()])
    h = adapter.embed(torch.tensor([[token]], device=position.device))
    return adapter.logits(_forward(adapter, h, position, p.cache, p.ctx, methods))[-1]


class NewToken:
    """The token a decode step feeds, as ``decode_layer`` sees it before layer ``layer``."""

    def __init__(self, hidden: torch.Tensor, position: torch.Tensor):
        self.hidden, self.position = hidden, position  # (1, 1, d), its RoPE position
        self.dropped = False

    def drop_kv(self) -> None:
        """Attend as usual in this step, but leave this token's keys / values out of this layer's cache."""
        self.dropped = True


def _forward(adapter, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, ctx: Context | None = None,
             methods=()) -> torch.Tensor:
    """``h`` (1, q, d) through every layer after each layer's cached tokens (causal among the new ones);
    methods with a ``decode_layer`` stage see the (single) new token before each layer."""
    q, past = h.shape[1], cache.lengths()
    pes = adapter.rotary_tables(h, positions)
    hooks = [m for m in methods if m.acts_in_decode_layers()]
    for i, layer in enumerate(adapter.layers):
        token = NewToken(h, positions) if hooks else None
        for m in hooks:
            _call_stage(ctx, m, "decode_layer", {}, i, token)
        h = _call_layer(layer, h, positions, pes[i], cache, adapter.attention_mask(i, past[i], q))
        if token is not None and token.dropped:
            cache.keys[i], cache.values[i] = cache.keys[i][..., :-q, :], cache.values[i][..., :-q, :]
    return h


def continuation(bundle, p: Prefill, methods, input_ids: torch.Tensor) -> torch.Tensor:
    """(q, vocab) logits of ``input_ids`` (1, q) fed after the prefill ``p``, teacher-forced: in one block
    (``extend``), or token by token (``teacher_forced``) where a method acts while decoding."""
    if any(m.acts_in_decode_layers() for m in methods):
        return teacher_forced(bundle, p, methods, input_ids)
    return extend(bundle, p.cache, input_ids, p.next_position)


def teacher_forced(bundle, p: Prefill, methods, input_ids: torch.Tensor) -> torch.Tensor:
    """Feed ``input_ids`` (1, q) after the prefill ``p`` one token at a time through the decode stages (as
    generation would, so decode-time methods act); returns (q, vocab) logits. For perplexity."""
    with torch.inference_mode():
        return torch.stack([_decode_step(bundle.adapter, p, methods, j, int(t), p.next_position + j)
                            for j, t in enumerate(input_ids[0].tolist())])


@torch.inference_mode()
def extend(bundle, cache: KVCache, input_ids: torch.Tensor, start_position: torch.Tensor) -> torch.Tensor:
    """Feed ``input_ids`` (1, q) after a (possibly compressed) cache; returns (q, vocab) logits.

    Teacher-forced continuation for perplexity: each layer attends over its own cached
    length plus the new tokens causally, with positions continuing from ``start_position``.
    """
    adapter = bundle.adapter
    pos = start_position + torch.arange(input_ids.shape[1], device=input_ids.device)
    return adapter.logits(_forward(adapter, adapter.embed(input_ids), pos, cache))
