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
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import torch

from mmlab.methods.base import Method, MethodError
from mmlab.quantize import applied
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
    """What methods see of the run (see ``mmlab.methods.base`` for the contract)."""

    model_name: str
    config: object  # the decoder's config
    n_layers: int
    has_image: bool
    trace: Trace
    sample_index: int = 0
    n_image_tokens: int = 0
    image_grid: tuple[int, int] | None = None  # (rows, cols) of one image's tokens, where they form a grid
    extras: dict = field(default_factory=dict)  # what a checkpoint carries besides weights (e.g. MoD routers)
    scratch: dict = field(default_factory=dict)
    _layers: object = None
    _layer_inputs: dict = field(default_factory=dict)  # layer -> (hidden_in, (cos, sin)) kept on demand

    def record_image_selection(self, image: int, kept: torch.Tensor, merged_into: torch.Tensor | None = None) -> None:
        self.trace.image_kept[image] = kept.detach().cpu()
        if merged_into is not None:
            self.trace.image_merged_into[image] = merged_into.detach().cpu()

    def cache_is_image(self, layer: int) -> torch.Tensor:
        """(len,) bool: which of layer ``layer``'s cached prompt tokens are visual tokens."""
        return (self.trace.modality[self.trace.layer_tokens[layer]] >= 0).to(self._layers[layer].self_attn.o_proj.weight.device)

    def attention_logits(self, layer: int, queries: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Pre-softmax attention scores ``(heads, q, k)`` of prefill layer ``layer`` (causal: -inf).

        Recomputed for the requested query rows only, from the layer's input and its KV
        cache: the model itself stays on SDPA. Available for the previous layer inside
        ``before_layer``, for layers listed in ``run(attention_layers=...)``, and for every
        layer in ``after_prefill`` when a method of the run sets ``prefill_attention``.
        """
        if layer not in self._layer_inputs:
            raise MethodError(f"attention of layer {layer} is not available here; "
                              f"only the previous layer's (or layers requested with attention_layers=)")
        hidden, (cos, sin), keys = self._layer_inputs[layer]
        attn = self._layers[layer].self_attn
        if not all(hasattr(attn, a) for a in ("q_proj", "head_dim", "scaling")):
            raise MethodError(f"{self.model_name}: its attention layers ({type(attn).__name__}) have no q_proj / "
                              f"head_dim / scaling to recompute attention scores from")
        n = hidden.shape[1]
        rows = torch.arange(n, device=hidden.device)[queries if queries is not None else slice(None)]
        rows = rows.reshape(-1)
        x = self._layers[layer].input_layernorm(hidden[:, rows])
        q = attn.q_proj(x).view(1, rows.numel(), -1, attn.head_dim).transpose(1, 2)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, _ = rope(q, q, cos[..., rows, :], sin[..., rows, :])
        k = keys[:, :, :n]  # this layer's own prefill keys (already rotated)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = ((q * attn.scaling) @ k.transpose(-1, -2)).float()  # scale q, not the (q x k) map
        causal = torch.arange(n, device=hidden.device)[None, :] > rows[:, None]
        return scores.masked_fill_(causal, float("-inf"))[0]  # in place: these maps can be heads x n x n

    def attention(self, layer: int, queries: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Softmax attention probabilities ``(heads, q, k)`` of prefill layer ``layer`` (see ``attention_logits``)."""
        p = self.attention_logits(layer, queries)
        p -= p.amax(-1, keepdim=True)  # softmax in place (no second heads x q x k buffer)
        p.exp_()
        return p.div_(p.sum(-1, keepdim=True))


def _timed(totals: dict, key: str, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    totals[key] = totals.get(key, 0.0) + (time.perf_counter() - t) * 1e3
    return out


def _call_layer(layer, hidden, positions, pe, cache, mask=None):
    # M-RoPE positions (3, 1, n) live in ``pe`` only; the layer takes 1-D text positions
    out = layer(hidden, attention_mask=mask, position_ids=positions if positions.dim() == 2 else None,
                past_key_values=cache, use_cache=True, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


def _weighted_layer(layer, hidden, positions, pe, cache, w):
    """A decoder layer computing x + attn(x) + w * mlp(x + attn(x)) (p-MoD's routed-token update)."""
    h = layer.input_layernorm(hidden)
    attn = layer.self_attn(hidden_states=h, attention_mask=None, position_ids=positions if positions.dim() == 2 else None,
                           past_key_values=cache, use_cache=True, position_embeddings=pe)[0]
    h = hidden + attn
    return h + w[None, :, None].to(h.dtype) * layer.mlp(layer.post_attention_layernorm(h))


@dataclass
class Prefill:
    """A finished prefill: its Trace so far, the (possibly compressed) cache and where decoding resumes."""

    trace: Trace
    cache: KVCache
    ctx: Context
    logits: torch.Tensor  # (1 or L, vocab)
    next_position: torch.Tensor  # RoPE position of the first generated token


def prefill(bundle, sample, methods: list[Method] | tuple = (), *, attention_layers=(), all_logits: bool = False,
            sample_index: int = 0) -> Prefill:
    """Vision tower, image-feature methods, the layer loop with ``before_layer``, then ``after_prefill``.

    A weight-quantization method's weights are swapped in for the call (computed once per model)."""
    methods = list(methods)
    _check_order(methods)
    with applied(bundle, methods) as quantized:
        p = _prefill(bundle, sample, methods, attention_layers, all_logits, sample_index)
    if quantized is not None:
        p.trace.extra.update(quantized.summary())
    return p


def _check_order(methods: list[Method]) -> None:
    for i, m in enumerate(methods):
        later = [o.name for o in methods[i + 1:] if type(o).after_prefill is not Method.after_prefill]
        if getattr(m, "quantizes_cache", False) and later:
            raise MethodError(f"{m.name} quantizes the KV cache, so it must come after the KV methods it composes "
                              f"with ({', '.join(later)}): list it last")


def _prefill(bundle, sample, methods, attention_layers, all_logits, sample_index) -> Prefill:
    lm = bundle.decoder
    layers = lm.layers
    n_layers = len(layers)
    inputs = sample if hasattr(sample, "input_ids") else bundle.encode(sample)
    trace = Trace(methods=[str(m) for m in methods], dims=bundle.dims())
    ctx = Context(bundle.name, lm.config, n_layers, inputs.pixel_values is not None, trace,
                  sample_index=sample_index, extras=bundle.extras, _layers=layers)
    bad = [a for a in attention_layers if not 0 <= a < n_layers]
    if bad:
        raise MethodError(f"attention_layers {bad} out of range; this model has layers 0..{n_layers - 1}")
    ctx.image_grid = trace.image_grid = bundle.image_grid(inputs) if ctx.has_image else None
    for m in methods:
        m.validate(ctx)
    # KV methods score the whole prefill after it ends: keep every layer's attention inputs until then
    keep_inputs = any(m.prefill_attention for m in methods)
    stage_ms: dict[str, float] = {}

    with torch.inference_mode():
        t0 = time.perf_counter()
        feats = _timed(stage_ms, "vision_ms", bundle.image_features, inputs)
        trace.n_image_tokens_in = sum(f.shape[0] for f in feats)
        for m in methods:
            feats = _timed(stage_ms, "method_ms", m.image_features, ctx, feats)
        tokens = bundle.assemble(inputs, feats, trace)
        ctx.n_image_tokens = int(tokens.is_image.sum())

        cache = KVCache(n_layers)
        for i, layer in enumerate(layers):
            for m in methods:
                _timed(stage_ms, "method_ms", m.before_layer, ctx, i, tokens)
            if not keep_inputs:
                ctx._layer_inputs.pop(i - 2, None)  # scores stay available one layer back only
            routed, weights, tokens.routed, tokens.weights = tokens.routed, tokens.weights, None, None
            sel = slice(None) if routed is None else routed
            trace.layer_tokens.append(tokens.source[sel])
            hidden_in, positions = tokens.hidden[:, sel], tokens.positions[..., sel]
            pe = lm.rotary_emb(hidden_in, positions)
            if weights is None:
                out = _call_layer(layer, hidden_in, positions, pe, cache)
            else:
                out = _weighted_layer(layer, hidden_in, positions, pe, cache, weights[sel])
            if routed is None:
                tokens.hidden = out
            else:  # skipped tokens ride the residual stream (scaled by their weight under STRing)
                skipped = tokens.hidden if weights is None else tokens.hidden * weights[None, :, None].to(out.dtype)
                tokens.hidden = skipped.index_copy(1, routed, out)
            ctx._layer_inputs[i] = (hidden_in, pe, cache.keys[i])
            if i in attention_layers:
                trace.attentions[i] = ctx.attention(i).cpu()
        h = lm.norm(tokens.hidden if all_logits else tokens.hidden[:, -1:])
        logits = bundle.lm_head(h)[0].float()
        if not keep_inputs:
            ctx._layer_inputs.clear()
        trace.kv_lengths_prefill = cache.lengths()
        for m in methods:
            _timed(stage_ms, "method_ms", m.after_prefill, ctx, cache)
        ctx._layer_inputs.clear()
        trace.kv_lengths_final = cache.lengths()
        trace.kv_bytes = cache.nbytes()
        trace.timings["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        trace.timings.update(stage_ms)
        trace.logits = logits[-1].cpu()
        if all_logits:
            trace.all_logits = logits.cpu()
    # decoding continues from the last prompt token's position, whatever was dropped before it
    return Prefill(trace, cache, ctx, logits, tokens.positions[..., -1:] + 1)


def run(bundle, sample, methods: list[Method] | tuple = (), *, max_new_tokens: int | None = None,
        attention_layers: tuple[int, ...] | list[int] = (), all_logits: bool = False,
        sample_index: int = 0) -> Trace:
    """Prefill + greedy decode of one sample under ``methods``; returns the Trace.

    A sample encoded with a ``context_len`` (``query_after=True``) is prefilled up to it, the
    methods compress that context, then the question's tokens are fed over the compressed
    cache (counted like decode tokens in the Trace) before generation starts.
    """
    methods = list(methods)
    with applied(bundle, methods):  # weights stay quantized through decoding
        return _run(bundle, sample, methods, max_new_tokens, attention_layers, all_logits, sample_index)


def _run(bundle, sample, methods, max_new_tokens, attention_layers, all_logits, sample_index) -> Trace:
    inputs = sample if hasattr(sample, "input_ids") else bundle.encode(sample)
    query = None
    if inputs.context_len is not None:
        query = inputs.input_ids[:, inputs.context_len:]
        inputs = dataclasses.replace(inputs, input_ids=inputs.input_ids[:, :inputs.context_len], context_len=None)
    p = prefill(bundle, inputs, methods, attention_layers=attention_layers, all_logits=all_logits,
                sample_index=sample_index)
    trace, cache, lm = p.trace, p.cache, bundle.decoder
    max_new = bundle.max_new_tokens if max_new_tokens is None else max_new_tokens
    next_pos, step_ms, ids, stop = p.next_position, [], [], bundle.stop_ids
    logits = p.logits[-1]
    if query is not None and query.shape[1]:
        t, lengths = time.perf_counter(), cache.lengths()
        logits = extend(bundle, cache, query, next_pos)[-1]
        trace.decode_kv_lengths += [[n + j + 1 for n in lengths] for j in range(query.shape[1])]
        trace.timings["query_ms"] = (time.perf_counter() - t) * 1e3
        trace.extra["query_tokens"] = query.shape[1]
        trace.logits = logits.cpu()
        next_pos = next_pos + query.shape[1]
    token = int(logits.argmax())
    with torch.inference_mode():
        for step in range(max_new):
            if token in stop:
                break
            ids.append(token)
            if step == max_new - 1:
                break
            t = time.perf_counter()
            for m in methods:
                m.decode_step(p.ctx, step, cache)
            trace.decode_kv_lengths.append([n + 1 for n in cache.lengths()])
            h = lm.embed_tokens(torch.tensor([[token]], device=next_pos.device))
            pe = lm.rotary_emb(h, next_pos)
            for layer in lm.layers:
                h = _call_layer(layer, h, next_pos, pe, cache)
            step_logits = bundle.lm_head(lm.norm(h))[0, -1].float()
            trace.step_logits.append(step_logits.cpu())
            token = int(step_logits.argmax())
            next_pos = next_pos + 1
            step_ms.append((time.perf_counter() - t) * 1e3)
    trace.answer_ids = ids
    trace.answer = bundle.decode(ids)
    trace.kv_bytes_final = cache.nbytes()
    if step_ms:
        trace.timings["decode_ms_per_token"] = float(torch.tensor(step_ms).median())
    return trace


@torch.inference_mode()
def extend(bundle, cache: KVCache, input_ids: torch.Tensor, start_position: torch.Tensor) -> torch.Tensor:
    """Feed ``input_ids`` (1, q) after a (possibly compressed) cache; returns (q, vocab) logits.

    Teacher-forced continuation for perplexity: each layer attends over its own cached
    length plus the new tokens causally, with positions continuing from ``start_position``.
    """
    lm = bundle.decoder
    q = input_ids.shape[1]
    h = lm.embed_tokens(input_ids)
    pos = start_position + torch.arange(q, device=h.device)
    pe = lm.rotary_emb(h, pos)
    for i, layer in enumerate(lm.layers):
        past = cache.lengths()[i]
        mask = torch.arange(past + q, device=h.device)[None, :] <= (past + torch.arange(q, device=h.device))[:, None]
        h = _call_layer(layer, h, pos, pe, cache, mask[None, None])
    return bundle.lm_head(lm.norm(h))[0].float()
