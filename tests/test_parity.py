"""Parity with the papers' official code: each test pins one rule on a small fixed input with
hand-checkable expected values. The official behaviour is described in each docstring with its
repository and file (read with the project's search tool); the code here is our own."""

import torch

from mmlab.engine import KVCache
from mmlab.methods import get


def _cache(n: int, layers: int = 1, heads: int = 2, dim: int = 32) -> KVCache:
    c = KVCache(layers)
    g = torch.Generator().manual_seed(n)
    for i in range(layers):
        c.keys[i] = torch.randn(1, heads, n, dim, generator=g)
        c.values[i] = torch.randn(1, heads, n, dim, generator=g)
    return c


def _full_precision(c: KVCache) -> tuple[int, int]:
    return c.keys[0].shape[-2], c.values[0].shape[-2]


def test_kivi_full_precision_windows_match_the_official_rule():
    """jy-yuan/KIVI, models/llama_kivi.py (prefill): keys are quantized up to n - n % R and the last
    n % R stay full precision (none when R divides n); values: the last R stay full precision (all of
    them when n <= R). R = residual_length = 128, G = group_size = 32."""
    kivi = get("kivi", bits=2, group_size=32, residual=128)
    for n, expected in {128: (0, 128), 200: (72, 128), 768: (0, 128), 100: (100, 100), 129: (1, 128)}.items():
        c = _cache(n)
        kivi.after_prefill(None, c)
        assert _full_precision(c) == expected, n
        q = c.quantized[0]
        assert ((q.key_length, q.value_length) if q else (0, 0)) == (n - expected[0], n - expected[1])
        assert c.lengths() == [n]


def test_kivi_decode_schedule_matches_the_official_rule():
    """llama_kivi.py (decoding): each new key joins the full-precision keys, which are quantized
    together once R have gathered; each new value joins the full-precision values, and once more than
    R are held the oldest one is quantized (one token at a time). Checked over 140 steps from n = 200."""
    kivi, r = get("kivi", bits=4, group_size=32, residual=128), 128
    c = _cache(200)
    kivi.after_prefill(None, c)
    n_k, n_v = _full_precision(c)
    for step in range(140):
        kivi.decode_step(None, step, c)  # before the token: the cache holds what earlier steps left
        assert _full_precision(c) == (n_k % r, min(n_v, r)), step
        k_new, v_new = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
        keys, values = c.update(k_new, v_new, 0)
        assert keys.shape[-2] == values.shape[-2] == 201 + step  # both sides add up to every token
        n_k, n_v = _full_precision(c)
    assert c.quantized[0].key_length == 256  # 200 -> 128 quantized at prefill, then 128 more once gathered
