"""The engine: one explicit prefill / decode loop over Hugging Face decoder layers.

    sample -> vision tower + projector -> image features       [stage image_features]
           -> assemble inputs_embeds + modality map
           -> for each decoder layer i:                          [stage before_layer(i)]
                  run layer i on the live tokens (own positions, own KV length)
           -> final norm + LM head                               [stage after_prefill(cache)]
           -> greedy decode, one token at a time                 [stage decode_step]
           -> Trace

Tokens removed by a method are physically gone from every later layer (and from those
layers' KV cache); nothing is masked. Positions are carried with the tokens, so a token
keeps its RoPE position when others are dropped; decoding continues from the last
prompt token's position + 1. One sample at a time (batch size 1).

The engine sees a model only through its adapter (``mmlab.arch``) and methods only through
their stages (``mmlab.methods.base``). Weight quantization is swapped in *around* it
(``mmlab.quantize.applied``, entered by ``mmlab.run``); the engine only checks it is in place.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from mmlab.arch import Adapter
from mmlab.methods.base import Method, MethodError
from mmlab.models import active_weights
from mmlab.trace import Trace


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
            return torch.cat([qk, self.keys[layer_idx]], -2), torch.cat([qv, self.values[layer_idx]], -2)
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

    def __len__(self) -> int:
        return self.hidden.shape[1]

    def route(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Mixture-of-Depths: only ``indices`` go through the *next* layer (attention + MLP, and
        only they write its KV); the others pass it unchanged on the residual stream and stay
        for the layers after. With ``weights`` (n,), the layer computes x + attn + w * mlp for
        routed tokens and w * x for skipped ones (p-MoD's STRing reweighting)."""
        self.routed, self.weights = self._subset(indices, "route"), weights

    def _subset(self, indices, what: str) -> torch.Tensor:
        idx = torch.as_tensor(indices, device=self.hidden.device).long().sort().values
        if idx.numel() == 0 or idx[-1] >= len(self) or idx[0] < 0:
            raise MethodError(f"{what}(): indices must be a non-empty subset of 0..{len(self) - 1}")
        return idx

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` (into the current sequence) from now on; order is preserved."""
        idx = self._subset(indices, "keep")
        if self.routed is not None:
            raise MethodError("keep() after route() in the same layer: prune first, then route")
        self.hidden = self.hidden.index_select(1, idx)
        self.positions = self.positions.index_select(-1, idx)
        self.source = self.source.index_select(0, idx)
        self.is_image = self.is_image.index_select(0, idx)


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
        return self.adapter.attention_logits(layer, hidden, pe, keys, rows)

    def attention(self, layer: int, queries: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Softmax attention probabilities ``(heads, q, k)`` of prefill layer ``layer`` (see ``attention_logits``)."""
        p = self.attention_logits(layer, queries)
        p -= p.amax(-1, keepdim=True)  # softmax in place (no second heads x q x k buffer)
        p.exp_()
        return p.div_(p.sum(-1, keepdim=True))


@dataclass
class Prefill:
    """A finished prefill: its Trace so far, the (possibly compressed) cache and where decoding resumes."""

    trace: Trace
    cache: KVCache
    ctx: Context
    logits: torch.Tensor  # (1 or L, vocab)
    next_position: torch.Tensor  # RoPE position of the first generated token


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
    check_methods(bundle, methods)
    inputs = sample if hasattr(sample, "input_ids") else bundle.encode(sample)
    ctx = _context(bundle, inputs, methods, attention_layers, sample_index)
    # KV methods score the whole prefill after it ends: keep every layer's attention inputs until then
    keep_inputs = any(m.prefill_attention for m in methods)
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
            _prefill_layer(bundle.adapter, i, tokens, cache, ctx)
            if i in attention_layers:
                ctx.trace.attentions[i] = ctx.attention(i).cpu()
        logits = bundle.adapter.logits(tokens.hidden if all_logits else tokens.hidden[:, -1:])
        if not keep_inputs:
            ctx._layer_inputs.clear()
        _compress(ctx, cache, methods, stage_ms)
        _finish_prefill(ctx.trace, cache, logits, all_logits, stage_ms, t0)
    # decoding continues from the last prompt token's position, whatever was dropped before it
    return Prefill(ctx.trace, cache, ctx, logits, tokens.positions[..., -1:] + 1)


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
    pe = adapter.rotary(hidden_in, positions, i)
    mask = adapter.attention_mask(i, 0, hidden_in.shape[1])
    if weights is None:
        out = _call_layer(adapter.layers[i], hidden_in, positions, pe, cache, mask)
    else:
        out = adapter.weighted_layer(i, hidden_in, positions, pe, cache, weights[sel], mask)
    if routed is None:
        tokens.hidden = out
    else:  # skipped tokens ride the residual stream (scaled by their weight under STRing)
        skipped = tokens.hidden if weights is None else tokens.hidden * weights[None, :, None].to(out.dtype)
        tokens.hidden = skipped.index_copy(1, routed, out)
    ctx._layer_inputs[i] = (hidden_in, pe, cache.keys[i])


def _compress(ctx: Context, cache: KVCache, methods, stage_ms: dict) -> None:
    """The after_prefill stage: KV eviction / merging / quantization."""
    ctx.trace.kv_lengths_prefill = cache.lengths()
    for m in methods:
        _call_stage(ctx, m, "after_prefill", stage_ms, cache)
    ctx._layer_inputs.clear()


def _finish_prefill(trace: Trace, cache: KVCache, logits, all_logits: bool, stage_ms: dict, t0: float) -> None:
    trace.kv_lengths_final = cache.lengths()
    trace.kv_bytes = cache.nbytes()
    trace.timings["prefill_ms"] = (time.perf_counter() - t0) * 1e3
    trace.timings.update(stage_ms)
    trace.logits = logits[-1].cpu()
    if all_logits:
        trace.all_logits = logits.cpu()


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
    inputs = sample if hasattr(sample, "input_ids") else bundle.encode(sample)
    query = None
    if inputs.context_len is not None:
        query = inputs.input_ids[:, inputs.context_len:]
        inputs = dataclasses.replace(inputs, input_ids=inputs.input_ids[:, :inputs.context_len], context_len=None)
    p = prefill(bundle, inputs, methods, attention_layers=attention_layers, all_logits=all_logits,
                sample_index=sample_index)
    logits, next_pos = p.logits[-1], p.next_position
    if query is not None and query.shape[1]:
        logits, next_pos = _feed_query(bundle, p, query)
    _generate(bundle, p, methods, logits, next_pos, bundle.max_new_tokens if max_new_tokens is None else max_new_tokens)
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
            token = _decode_step(bundle.adapter, p, methods, step, token, next_pos)
            next_pos = next_pos + 1
            step_ms.append((time.perf_counter() - t) * 1e3)
    p.trace.answer_ids = ids
    p.trace.answer = bundle.decode(ids)
    p.trace.kv_bytes_final = p.cache.nbytes()
    if step_ms:
        p.trace.timings["decode_ms_per_token"] = float(torch.tensor(step_ms).median())


def _decode_step(adapter, p: Prefill, methods, step: int, token: int, position: torch.Tensor) -> int:
    for m in methods:
        m.decode_step(p.ctx, step, p.cache)
    p.trace.decode_kv_lengths.append([n + 1 for n in p.cache.lengths()])
    h = adapter.embed(torch.tensor([[token]], device=position.device))
    logits = adapter.logits(_forward(adapter, h, position, p.cache))[-1]
    p.trace.step_logits.append(logits.cpu())
    return int(logits.argmax())


def _forward(adapter, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """``h`` (1, q, d) through every layer after each layer's cached tokens (causal among the new ones)."""
    q, past = h.shape[1], cache.lengths()
    pes = adapter.rotary_tables(h, positions)
    for i, layer in enumerate(adapter.layers):
        h = _call_layer(layer, h, positions, pes[i], cache, adapter.attention_mask(i, past[i], q))
    return h


@torch.inference_mode()
def extend(bundle, cache: KVCache, input_ids: torch.Tensor, start_position: torch.Tensor) -> torch.Tensor:
    """Feed ``input_ids`` (1, q) after a (possibly compressed) cache; returns (q, vocab) logits.

    Teacher-forced continuation for perplexity: each layer attends over its own cached
    length plus the new tokens causally, with positions continuing from ``start_position``.
    """
    adapter = bundle.adapter
    pos = start_position + torch.arange(input_ids.shape[1], device=input_ids.device)
    return adapter.logits(_forward(adapter, adapter.embed(input_ids), pos, cache))
