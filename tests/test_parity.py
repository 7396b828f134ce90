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


def _ctx():
    from types import SimpleNamespace

    return SimpleNamespace(trace=SimpleNamespace(extra={}))  # KIVI records its quantized lengths there


def _full_precision(c: KVCache) -> tuple[int, int]:
    return c.keys[0].shape[-2], c.values[0].shape[-2]


def test_kivi_full_precision_windows_match_the_official_rule():
    """jy-yuan/KIVI, models/llama_kivi.py (prefill): keys are quantized up to n - n % R and the last
    n % R stay full precision (none when R divides n); values: the last R stay full precision (all of
    them when n <= R). R = residual_length = 128, G = group_size = 32."""
    kivi = get("kivi", bits=2, group_size=32, residual=128)
    for n, expected in {128: (0, 128), 200: (72, 128), 768: (0, 128), 100: (100, 100), 129: (1, 128)}.items():
        c, ctx = _cache(n), _ctx()
        kivi.after_prefill(ctx, c)
        assert ctx.trace.extra["kv_quantized"].get(0, (0, 0)) == (n - expected[0], n - expected[1])
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
    kivi.after_prefill(_ctx(), c)
    n_k, n_v = _full_precision(c)
    for step in range(140):
        kivi.decode_step(None, step, c)  # before the token: the cache holds what earlier steps left
        assert _full_precision(c) == (n_k % r, min(n_v, r)), step
        k_new, v_new = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
        keys, values = c.update(k_new, v_new, 0)
        assert keys.shape[-2] == values.shape[-2] == 201 + step  # both sides add up to every token
        n_k, n_v = _full_precision(c)
    assert c.quantized[0].key_length == 256  # 200 -> 128 quantized at prefill, then 128 more once gathered


def test_gptq_symmetric_rounding_divides_as_the_official_code():
    """IST-DASLab/gptq, quant.py: ``q = clamp(round(x / scale) + zero, 0, maxq)`` with
    ``scale = 2 max|x| / maxq`` and ``zero = (maxq + 1) / 2`` when symmetric. 4 bits, one row, H = I
    (no error to propagate): scale = 7 / 15; 0.7 / scale is exactly 1.5 (rounds to 2), while
    0.7 * (1 / scale) is 1.4999999 (rounds to 1). Ties round half to even (-4.5 -> -4, 4.5 -> 4)."""
    from mmlab.methods.quant import gptq, rtn

    w = torch.tensor([[-2.1, 2.2, 1.8, -0.6, 0.7, 2.1, -2.0, -3.5]])
    q, _, _ = gptq(w, torch.eye(8), 4, None, True)
    scale = 2 * 3.5 / 15
    assert torch.equal(torch.round(q / scale), torch.tensor([[-4.0, 5, 4, -1, 2, 4, -4, -8]]))
    # RTN keeps torchao's arithmetic (times the reciprocal), which lands on 1 at that tie
    assert torch.round(rtn(w, 4, None, True) / scale)[0, 4] == 1


def test_gptq_hessian_normalisation_does_not_change_the_codes():
    """IST-DASLab/gptq, gptq.py ``add_batch``: H = 2/n Σ x xᵀ with n counting *sequences*
    (``inp.shape[0]``), where we divide by the number of tokens; damping is relative
    (``percdamp * mean(diag H)``), so the two differ by a constant factor that cancels: with a
    power-of-two factor (512 tokens per calibration window) the codes are bitwise identical."""
    from mmlab.methods.quant import gptq

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(16, 64, generator=g), torch.randn(1024, 64, generator=g)
    h = 2 * x.T @ x / len(x)
    for bits, group in ((3, 16), (4, None)):
        assert torch.equal(gptq(w, h, bits, group, False)[0], gptq(w, 512 * h, bits, group, False)[0])


def _unit(c: float) -> list[float]:
    """A 4-d key at cosine ``c`` from e1."""
    return [c, (1 - c * c) ** 0.5, 0.0, 0.0]


def test_lookm_weighted_filter_is_shared_across_heads():
    """SUSTechBruce/LOOK-M, kv_token_merge/modify_llama.py (WeightedMergeKVCache_LayerWise):
    ``filter_indices = (max_values.mean(1) >= max_values.mean())``: the j-th evicted token of every
    head joins the merge when its best similarity averaged over heads reaches the mean over all heads
    and evictions; it is added scaled by that similarity, (k_c + sum s_e k_e) / (1 + n_c).
    3 heads, token 0 kept, tokens 1 and 2 evicted with similarities h0 (0.9, 0.1), h1 (0.8, 0.2),
    h2 (0.3, 0.7): slot means 0.667 / 0.333 against 0.5, so slot 1 joins in every head (a per-head
    filter would have taken slot 2 in head 2)."""
    from mmlab.methods.kv_cache import merge_into_kept

    sims = [(0.9, 0.1), (0.8, 0.2), (0.3, 0.7)]
    keys = torch.tensor([[[1.0, 0, 0, 0], _unit(a), _unit(b)] for a, b in sims])[None]  # (1, 3, 3, 4)
    values = torch.tensor([[[1.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 100.0, 0]]] * 3)[None]
    k, v, into = merge_into_kept(keys, values, torch.zeros(3, 1, dtype=torch.long), "weighted")
    assert into.tolist() == [[-1, 0, -1]] * 3  # the shared filter: slot 1 joins token 0 in every head
    for h, (a, _) in enumerate(sims):
        assert torch.allclose(v[0, h, 0], torch.tensor([1.0, 10 * a, 0, 0]) / 2), h
        assert torch.allclose(k[0, h, 0], (torch.tensor([1.0, 0, 0, 0]) + a * torch.tensor(_unit(a))) / 2)


def test_lookm_official_text_prior_keeps_every_text_token():
    """modify_llama.py (TextAVGMergeKVCache_LayerWise): image and recent tokens get -65516, the top
    hh_size of the rest are marked, and the cache keeps every token whose score is still >= 0: all
    text, the marked tokens and the recent window, so with more text than the heavy-hitter share the
    cache exceeds the budget. 20 tokens (12 image, 8 text), budget 6 (3 recent, here text): the default
    keeps 6, keep_all_text all 8 text tokens."""
    from types import SimpleNamespace

    is_image = torch.tensor([False] * 4 + [True] * 12 + [False] * 4)  # text 0-3, images 4-15, text 16-19
    scores = torch.arange(20, dtype=torch.float)[None].expand(2, -1)
    ctx = SimpleNamespace(cache_is_image=lambda layer: is_image, trace=SimpleNamespace(extra={}))
    keys, values = torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4)
    for keep_all, expected in ((False, [2, 3, 17, 18, 19, 16]), (True, [0, 1, 2, 3, 16, 17, 18, 19])):
        m = get("lookm", budget=6, recent_ratio=0.5, merge="none", keep_all_text=keep_all)
        m.scores = lambda ctx, layer, keys: scores
        _, _, kept = m.compress(ctx, 0, keys, values, 6)
        assert sorted(kept[0].tolist()) == sorted(expected) and kept.shape[0] == 2, keep_all


def test_awq_scales_follow_the_official_formula():
    """mit-han-lab/llm-awq, awq/quantize/auto_scale.py (_search_module_scale): for ratio k / 20,
    scales = x_max.pow(ratio).clamp(min=1e-4), then divided by sqrt(max * min), with x_max the mean
    |x| per input channel. mean|x| = (1, 4, 16) at ratio 0.5: (1, 2, 4) / sqrt(4 * 1) = (0.5, 1, 2);
    at ratio 0 every scale is 1."""
    from mmlab.methods.quant import awq_scales

    x_mean = torch.tensor([1.0, 4.0, 16.0])
    assert torch.allclose(awq_scales(x_mean, 0.5), torch.tensor([0.5, 1.0, 2.0]))
    assert torch.equal(awq_scales(x_mean, 0.0), torch.ones(3))
    assert torch.allclose(awq_scales(torch.tensor([0.0, 1.0]), 1.0), torch.tensor([1e-4, 1.0]) / 1e-2)


def test_spqr_leave_one_out_and_threshold_follow_the_official_rule():
    """Vahe1994/SpQR ``spqr_engine.py``: ``get_leave_one_out_error`` returns, per weight, the drop
    of the row's scaled squared error when the group's quantizer is fitted without it (and it is
    not quantized); weights whose drop exceeds tau are replaced by the mean of the row's others
    while the statistics are fitted. Row [0, 1, 2, 10], 2 bits asymmetric, unit H^-1 diagonal:
    full fit scale 10/3 -> errors 0, 1, 4/3, 0 (sum 25/9); without 10: scale 2/3 -> 1/9 left;
    without 2: 1; without 1: 16/9; without 0: the range is still [0, 10] -> no drop.
    tau = threshold x mean_j var(W[:, j]) / [H^-1 Cholesky]_jj^2 (``outlier_scale``)."""
    from mmlab.methods.quant import spqr_fit_group, spqr_loo_reduction

    grp = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    red = spqr_loo_reduction(grp, torch.ones(4), 2, False)
    assert torch.allclose(red, torch.tensor([[0.0, 1.0, 16 / 9, 25 / 9 - 1 / 9]]), atol=1e-5)
    assert spqr_fit_group(grp, torch.ones(4), 2, False, tau=2.0).tolist() == [[0.0, 1.0, 2.0, 1.0]]
    # with H = I (no error feedback) the whole rule is checkable group by group
    from mmlab.methods.quant import gptq, qparams, quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g) * 0.1
    w[2, 7] = 3.0
    q, n_out, _ = gptq(w, torch.eye(32), 3, 16, False, damp=0.0, outlier_threshold=0.2)
    tau = 0.2 * float(w.var(0).mean())
    want, n_want = [], 0
    for c in (0, 16):
        grp = w[:, c:c + 16]
        scale, zero, maxq = qparams(spqr_fit_group(grp, torch.ones(16), 3, False, tau), 3, False)
        qg = quantize(grp, scale, zero, maxq, divide=True)
        out = (grp - qg) ** 2 > tau
        want.append(torch.where(out, grp, qg))
        n_want += int(out.sum())
    assert torch.equal(q, torch.cat(want, 1)) and q[2, 7] == 3.0 and n_out == n_want >= 1


def test_slim_salience_and_search_criterion_follow_the_official_code():
    """Aaronhuang-778/SliM-LLM ``slim-llm/slim_gptq.py``: a block's salience is
    sum W[:, block]^2 / diag(Hinv)^2 with Hinv = cholesky(cholesky_inverse(cholesky(H)), upper=True)
    (the Cholesky factor GPTQ uses, not H^-1's diagonal); ``utils/bitsearch.py`` tries k = 1 ..
    blocks/2 - 1 (k blocks up a bit, k down) and ``utils/reconstruct.py`` scores each by
    F.kl_div(log softmax(out), softmax(X Q(W)^T), 'batchmean') with both clamped at 1e-6.
    For diagonal H = diag(1, 4, 1, 4), U_jj = 1 / sqrt(H_jj): w = [[1, 1, 2, 0], [0, 1, 0, 1]]
    -> blocks of 2: (1 + 1 x 4 + 0 + 1 x 4) = 9 and (4 x 1 + 0 + 0 + 1 x 4) = 8."""
    import torch.nn.functional as F

    from mmlab.methods.quant import slim_kl, slim_salience

    h = torch.diag(torch.tensor([1.0, 4.0, 1.0, 4.0]))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).diagonal()
    w = torch.tensor([[1.0, 1.0, 2.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    assert torch.allclose(slim_salience(w, u, 2), torch.tensor([9.0, 8.0]))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    official = F.kl_div(torch.log(b.softmax(-1).clamp(min=1e-6)), a.softmax(-1).clamp(min=1e-6), reduction="batchmean")
    assert abs(slim_kl(a, b) - float(official)) < 1e-6
