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


def trace_flops(trace) -> dict[str, float]:
    dm = trace.dims
    if not dm:
        return {"prefill": 0.0, "decode": 0.0, "total": 0.0}
    d, d_q, d_kv, d_ff, vocab = dm["hidden"], dm["q_dim"], dm["kv_dim"], dm["ffn"], dm["vocab"]
    prefill = sum(layer_flops(n, n, d, d_q, d_kv, d_ff) for n in trace.tokens_per_layer)
    prefill += 2 * d * vocab * (trace.prompt_length if trace.all_logits is not None else 1)
    decode = 0.0
    for lengths in trace.decode_kv_lengths:
        decode += sum(layer_flops(1, m, d, d_q, d_kv, d_ff) for m in lengths) + 2 * d * vocab
    return {"prefill": prefill, "decode": decode, "total": prefill + decode}
