"""Analytic FLOPs of the language model, from a Trace's real per-layer token counts.

One counter for every method (so FLOPs ratios between methods are comparable):
per decoder layer with ``n`` query tokens attending over ``m`` keys,

    projections  2 n d (d_q + 2 d_kv) + 2 n d_q d     (q, k, v, o)
    attention    2 n m d_q  (scores)  + 2 n m d_q  (weighted values)
    MLP (SwiGLU) 3 * 2 n d d_ff                       (gate, up, down)

plus the LM head on the positions whose logits are computed. ``m`` is the full key
length each query is given (prefill: the layer's own token count, as FastV / p-MoD count
it, without halving for the causal mask). FLOPs = 2 x multiply-accumulates. Language
model only, as FastV / DivPrune / p-MoD report them: the vision tower and projector
are not counted (pre-LLM methods do not change them).
"""

from __future__ import annotations


def layer_flops(n: int, m: int, d: int, d_q: int, d_kv: int, d_ff: int) -> float:
    proj = 2 * n * d * (d_q + 2 * d_kv) + 2 * n * d_q * d
    attn = 4 * n * m * d_q
    mlp = 3 * 2 * n * d * d_ff
    return float(proj + attn + mlp)


def sparse_layer_flops(n: int, pairs: float, own_pairs: float, gated: float, d: int, d_q: int, d_kv: int,
                       d_ff: int) -> float:
    """A layer whose attention pattern a method restricted, as a kernel that skips the masked work would
    run it: scores and weighted values scaled by the allowed (query, key) ``pairs`` over the layer's own
    causal pattern's ``own_pairs`` (so an unrestricted layer counts as in ``layer_flops``), and no query /
    output projection for the ``gated`` (token, head) outputs that are cut (both per head on average; the
    key / value projections are still counted in full)."""
    attn = 4 * n * n * d_q
    return layer_flops(n, n, d, d_q, d_kv, d_ff) - attn * (1 - pairs / own_pairs) - 4 * gated * d * d_q


def trace_flops(trace) -> dict[str, float]:
    """``prefill`` / ``decode`` / ``total``: the work the engine did, counted from the tokens each layer
    really processed; ``prefill_sparse``: the same prefill with every restricted layer counted as a
    sparse-attention kernel would run it (equal to ``prefill`` when no method restricted attention)."""
    dm = trace.dims
    if not dm:
        return {"prefill": 0.0, "prefill_sparse": 0.0, "decode": 0.0, "total": 0.0}
    d, d_q, d_kv, d_ff, vocab = dm["hidden"], dm["q_dim"], dm["kv_dim"], dm["ffn"], dm["vocab"]
    per_layer = [layer_flops(n, n, d, d_q, d_kv, d_ff) for n in trace.tokens_per_layer]
    sparse = list(per_layer)
    for i, r in trace.restricted.items():
        sparse[i] = sparse_layer_flops(trace.tokens_per_layer[i], r["pairs"], r["own_pairs"], r["gated"], d, d_q,
                                       d_kv, d_ff)
    head = 2 * d * vocab * (trace.prompt_length if trace.all_logits is not None else 1)
    prefill, prefill_sparse = sum(per_layer) + head, sum(sparse) + head
    decode = 0.0
    for lengths in trace.decode_kv_lengths:
        decode += sum(layer_flops(1, m, d, d_q, d_kv, d_ff) for m in lengths) + 2 * d * vocab
    return {"prefill": prefill, "prefill_sparse": prefill_sparse, "decode": decode, "total": prefill + decode}


def decode_without_cache(trace) -> float:
    """Decode FLOPs of the same generation run without a KV cache: each step re-runs every layer over the
    tokens that layer would hold (its ``decode_kv_lengths`` entry, queries = keys), as Dynamic-LLaVA's
    no-cache inference does (its dropped generated tokens leave the sequence at the sparse layer)."""
    dm = trace.dims
    if not dm:
        return 0.0
    d, d_q, d_kv, d_ff, vocab = dm["hidden"], dm["q_dim"], dm["kv_dim"], dm["ffn"], dm["vocab"]
    return sum(sum(layer_flops(m, m, d, d_q, d_kv, d_ff) for m in lengths) + 2 * d * vocab
               for lengths in trace.decode_kv_lengths)
