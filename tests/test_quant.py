"""Quantization methods: the quantizer against a transcription and against torchao, GPTQ's
and AWQ's guarantees, SpQR / SliM-LLM / MixLLM bookkeeping, KIVI's packed cache, errors."""

import math

import pytest
import torch

import mmlab
from mmlab.methods import get
from mmlab.methods.base import MethodError
from mmlab.methods.quant import _pack, _unpack, gptq, rtn
from mmlab.quantize import WeightContext, quantized_weights, torchao_config, torchao_quantize


def _rtn_loop(w, bits, group, sym):
    """A plain transcription: one group at a time, GPTQ's Quantizer formulas."""
    out = torch.empty_like(w)
    g = group or w.shape[1]
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c:c + g]
            if sym:
                scale = 2 * x.abs().max() / (2 ** bits - 1)
                zero = math.floor(2 ** bits / 2)
            else:
                lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
                scale = torch.tensor((hi - lo) / (2 ** bits - 1))
                zero = round(-lo / scale.item())
            q = torch.clamp(torch.round(x * (1.0 / scale)) + zero, 0, 2 ** bits - 1)
            out[r, c:c + g] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, None, False), (2, 16, True), (8, 64, True)])
def test_rtn_matches_a_loop_transcription(bits, group, sym):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits))
    assert torch.allclose(rtn(w, bits, group, sym), _rtn_loop(w, bits, group, sym), atol=1e-6)
    assert all(len(v.unique()) <= 2 ** bits for v in rtn(w, bits, group, sym).reshape(-1, group or 64))


@pytest.mark.parametrize("scheme,kw,ours", [
    ("int8_weight", {}, (8, None, True)),
    ("intx_weight", {"bits": 4, "group_size": 32, "sym": True}, (4, 32, True)),
    ("intx_weight", {"bits": 3, "group_size": 32, "sym": False}, (3, 32, False)),
])
def test_rtn_codes_equal_torchao(scheme, kw, ours):
    from torchao.quantization import quantize_

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    lin = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    lin[0].weight.data = w.clone()
    quantize_(lin, torchao_config(scheme, **kw))
    assert torch.equal(lin[0].weight.dequantize(), rtn(w, *ours))


def test_our_rtn_perplexity_matches_torchao_kernels(smol):
    text = mmlab.data.offline_corpus()
    ours = mmlab.perplexity(smol, text, [get("rtn", bits=4, group_size=32, sym=False)], window=128, max_windows=1,
                            progress=False).perplexity
    real = torchao_quantize(smol, "intx_weight", bits=4, group_size=32, sym=False)
    theirs = mmlab.perplexity(real, text, window=128, max_windows=1, progress=False).perplexity
    fp = mmlab.perplexity(smol, text, window=128, max_windows=1, progress=False).perplexity
    assert abs(theirs / ours - 1) < 0.005
    assert ours != fp  # the weights really changed


def test_gptq_with_identity_hessian_is_rtn_and_beats_it_otherwise():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    q, n_out, _ = gptq(w, torch.eye(64), 3, 16, False, damp=0.0)
    assert torch.allclose(q, rtn(w, 3, 16, False), atol=1e-6) and n_out == 0
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    q, _, _ = gptq(w, 2 * x.T @ x / len(x), 3, 16, False)
    err = lambda wq: ((x @ (w - wq).T) ** 2).mean()  # noqa: E731
    assert err(q) < 0.7 * err(rtn(w, 3, 16, False))


def test_awq_beats_rtn_on_salient_channels():
    """AWQ's scale search (and its clipping search) lower the layer's output error below RTN's at the
    same bits, most where a few input channels carry large activations (the paper's premise)."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(32, 64, generator=g), torch.randn(512, 64, generator=g)
    x[:, :4] *= 20  # salient input channels
    awq = get("awq", bits=3, group_size=16)
    err = lambda wq: ((x @ (w - wq).T) ** 2).mean()  # noqa: E731
    s = awq.search_scale(x, [w])
    scaled = awq.quantize_scaled(w * s, x / s, clip=False) / s
    clipped = awq.quantize_scaled(w * s, x / s, clip=True) / s
    assert err(scaled) < 0.6 * err(rtn(w, 3, 16, False))
    assert err(clipped) <= err(scaled)


def test_spqr_keeps_planted_outliers_exactly():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g)
    w[3, 5], w[9, 40] = 25.0, -30.0
    x = torch.randn(256, 64, generator=g)
    q, n_out, _ = gptq(w, 2 * x.T @ x / len(x), 3, 16, False, outlier_threshold=0.2, stat_bits=3)
    # kept at full precision (their value after GPTQ's updates from earlier columns), not on the 3-bit grid
    assert abs(q[3, 5] - 25.0) < 0.5 and abs(q[9, 40] + 30.0) < 0.5 and 2 <= n_out <= 0.05 * w.numel()
    _, none, _ = gptq(w, 2 * x.T @ x / len(x), 3, 16, False, stat_bits=3)
    assert none == 0


def test_effective_bits_count_scales_and_zeros(tiny):
    qw = quantized_weights(tiny, get("rtn", bits=4, group_size=128, sym=False))
    assert qw.weight_bits == pytest.approx(4 + (16 + 4) / 128)
    qw = quantized_weights(tiny, get("rtn", bits=3, group_size=None, sym=True))
    widths = {n: w.shape[1] for n, w in qw.weights.items()}
    expect = sum(qw.numel[n] * 3 + qw.numel[n] / widths[n] * 16 for n in widths) / sum(qw.numel.values())
    assert qw.weight_bits == pytest.approx(expect)
    assert qw.packed_bytes < sum(p.numel() * 4 for p in tiny.model.parameters())


def test_weights_swap_in_for_a_run_and_back(tiny, test_samples):
    before = {n: p.data_ptr() for n, p in tiny.model.named_parameters()}
    m = get("rtn", bits=2, group_size=32)
    tr = mmlab.run(tiny, test_samples[0], [m])
    assert {n: p.data_ptr() for n, p in tiny.model.named_parameters()} == before
    assert tr.extra["weight_bits"] == pytest.approx(2 + 18 / 32)
    ref = mmlab.run(tiny, test_samples[0])
    assert (tr.logits - ref.logits).abs().max() > 1e-3  # 2-bit weights change the logits
    assert quantized_weights(tiny, m) is quantized_weights(tiny, get("rtn", bits=2, group_size=32))  # computed once


def test_calibrated_methods_on_tiny_llava(tiny, test_samples):
    """GPTQ / AWQ / SliM-LLM / SpQR / MixLLM run end to end and keep their bookkeeping promises."""
    # GPTQ's promise is layer-wise: less output error than RTN on its calibration inputs (first block:
    # the same inputs for both, since nothing before it is quantized)
    gq = quantized_weights(tiny, get("gptq", bits=2, group_size=32, calib_samples=8))
    rq = quantized_weights(tiny, get("rtn", bits=2, group_size=32))
    wctx = WeightContext(tiny, "llm")
    block = wctx.blocks[0]
    xs = wctx.inputs(block, wctx.calibration(8, 512), max_tokens=10**6)
    for n in block:
        w, x = wctx.linears[n].weight, xs[n]
        assert ((x @ (gq.weights[n] - w).T) ** 2).mean() < ((x @ (rq.weights[n] - w).T) ** 2).mean()
    slim = get("slim", bits=2, group_size=32, calib_samples=8)
    qw = quantized_weights(tiny, slim)
    for name, note in qw.notes.items():
        assert sum(note["group_bits"]) == 2 * len(note["group_bits"])  # the average stays at 2 bits
    mix = get("mixllm", bits=3, group_size=32, high_fraction=0.2, calib_samples=4)
    qw = quantized_weights(tiny, mix)
    rows = sum(w.shape[0] for w in qw.weights.values())
    assert sum(n["high_channels"] for n in qw.notes.values()) == pytest.approx(0.2 * rows, abs=2)
    expect = sum(n["high_channels"] * c * (8 + 24 / 32) + (w.shape[0] - n["high_channels"]) * c * (3 + 19 / 32)
                 for (name, w), n, c in ((i, qw.notes[i[0]], i[1].shape[1]) for i in qw.weights.items()))
    assert qw.weight_bits == pytest.approx(expect / sum(qw.numel.values()))
    spqr = quantized_weights(tiny, get("spqr", calib_samples=4))
    assert spqr.outliers > 0 and 3.3 < spqr.weight_bits < 4.5
    assert mmlab.run(tiny, test_samples[0], [get("awq", bits=3, calib_samples=4)]).answer


def test_awq_calibrates_on_full_precision_inputs_shared_across_configs(tiny):
    """AWQ searches every layer on the full-precision model's activations (llm-awq's run_awq takes a
    layer's outputs before its scales and clips apply), so every AWQ config of a model shares them: a
    second config reads them from the first and computes the same weights as it does alone."""
    from mmlab import quantize

    quantize._SHARED.clear()
    quantized_weights(tiny, get("awq", bits=2, group_size=32, calib_samples=4))
    wctx = WeightContext(tiny, "llm")
    block, xs = wctx.blocks[1], []
    hook = wctx.linears[block[0]].register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    for s in wctx.calibration(4, 512):
        mmlab.prefill(tiny, s)  # the full-precision model
    hook.remove()
    x = torch.cat(xs)
    x = x[torch.linspace(0, len(x) - 1, min(2048, len(x))).long()]
    shared = quantize._SHARED[tiny.model]["items"][("inputs", tuple(block), 2048)][block[0]]
    torch.testing.assert_close(shared, x, rtol=1e-5, atol=1e-6)  # not the 2-bit predecessors' outputs
    three = get("awq", bits=3, group_size=32, calib_samples=4)
    reused = quantized_weights(tiny, three)
    quantize._SHARED.clear()
    quantize._STATE[tiny.model]["cache"].clear()
    alone = quantized_weights(tiny, three)
    assert reused is not alone and all(torch.equal(reused.weights[n], alone.weights[n]) for n in alone.weights)


def test_mixllm_gradients_shared_across_configs(tiny):
    """MixLLM's loss gradients come from the full-precision model, so its configs share them; a shared
    run gives the same weights as a fresh one."""
    from mmlab import quantize

    quantize._SHARED.clear()
    quantized_weights(tiny, get("mixllm", bits=4, group_size=32, calib_samples=2))
    held = quantize._SHARED[tiny.model]["items"][("gradients",)]
    three = get("mixllm", bits=3, group_size=32, calib_samples=2)
    reused = quantized_weights(tiny, three)
    assert quantize._SHARED[tiny.model]["items"][("gradients",)] is held
    quantize._SHARED.clear()
    quantize._STATE[tiny.model]["cache"].clear()
    alone = quantized_weights(tiny, three)
    assert all(torch.equal(reused.weights[n], alone.weights[n]) for n in alone.weights)


def test_calibration_runs_on_pinned_threads(tiny, monkeypatch):
    """Weights are computed on CALIBRATION_THREADS threads whatever the runner offers (last-bit BLAS
    differences between thread counts change GPTQ's rounding cascade), and the count is restored."""
    from mmlab import quantize

    seen = []
    monkeypatch.setattr(quantize, "CALIBRATION_THREADS", 1)
    monkeypatch.setattr(get("rtn").__class__, "quantize_weights",
                        lambda self, wctx: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        quantized_weights(tiny, get("rtn", bits=5, group_size=None))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_vision_tower_is_quantized_separately(tiny):
    llm = quantized_weights(tiny, get("rtn", bits=4, group_size=None, targets="llm")).weights
    vis = quantized_weights(tiny, get("rtn", bits=4, group_size=None, targets="vision")).weights
    assert llm and vis and not set(llm) & set(vis)
    assert all("language_model" in n for n in llm) and not any("language_model" in n for n in vis)


def test_activation_quantization(smol):
    text = mmlab.data.offline_corpus()
    kw = dict(window=256, max_windows=1, progress=False)
    fp = mmlab.perplexity(smol, text, **kw).perplexity
    w8a8 = mmlab.perplexity(smol, text, [get("act_quant", bits=8, act_bits=8)], **kw).perplexity
    w4a4 = mmlab.perplexity(smol, text, [get("act_quant", bits=4, act_bits=4)], **kw).perplexity
    assert fp < w8a8 < 1.1 * fp < w4a4
    mod = smol.decoder.layers[0].self_attn.q_proj
    assert not mod._forward_pre_hooks  # the activation hooks are gone after the run


def test_kivi_packs_the_cache_and_keeps_the_recent_window(smol):
    assert torch.equal(_unpack(_pack(torch.tensor([0, 3, 1, 2, 3]), 2), 2, 5), torch.tensor([0, 3, 1, 2, 3]))
    ids = smol.tokenizer(mmlab.data.offline_corpus()[:4000], return_tensors="pt").input_ids[:, :300]
    from mmlab.models import Inputs

    full = mmlab.prefill(smol, Inputs(ids))
    sizes = [full.trace.kv_bytes]
    for bits in (8, 4, 2):
        p = mmlab.prefill(smol, Inputs(ids), [get("kivi", bits=bits, group_size=32, residual=64)])
        c = p.cache
        assert c.lengths() == full.cache.lengths()
        assert c.keys[0].shape[-2] == 300 % 64 and c.values[0].shape[-2] == 64  # KIVI's full-precision windows
        assert torch.equal(c.keys[0], full.cache.keys[0][:, :, -c.keys[0].shape[-2]:])
        assert torch.equal(c.values[0], full.cache.values[0][:, :, -64:])
        sizes.append(p.trace.kv_bytes)
        q = c.quantized[0]
        fp_bytes = (q.key_length + q.value_length) * full.cache.keys[0][:, :, :1].numel() * 4
        assert q.nbytes() < (bits / 32 + 0.15) * fp_bytes  # packed codes + fp16 scales and minima
        k, _ = q.dequantize()
        err = (k - full.cache.keys[0][:, :, :k.shape[-2]]).abs().max() / full.cache.keys[0].abs().max()
        assert err < {8: 0.01, 4: 0.1, 2: 0.4}[bits]
    assert sizes == sorted(sizes, reverse=True)


def test_kivi_moves_tokens_while_decoding(smol):
    tr = mmlab.run(smol, "Write two sentences about rivers.", [get("kivi", bits=4, group_size=8, residual=8)],
                   max_new_tokens=24)
    assert len(tr.answer_ids) > 16 and tr.kv_bytes_final < 0.5 * 4 * sum(tr.decode_kv_lengths[-1]) * 2 * 3 * 64


def test_methods_compose(tiny, test_samples):
    ms = [get("divprune", keep_ratio=0.25), get("rtn", bits=4, group_size=32), get("h2o", budget=0.5),
          get("kivi", bits=4, residual=8)]
    tr = mmlab.run(tiny, test_samples[0], ms)
    assert tr.answer and tr.extra["weight_bits"] < 5 and tr.n_image_tokens_in > tr.image_tokens_per_layer()[0]


@pytest.mark.parametrize("name,params,match", [
    ("rtn", {"bits": 0}, "bits must be an integer in 1..8"),
    ("rtn", {"bits": 9}, "bits must be an integer in 1..8"),
    ("gptq", {"bits": 3.5}, "bits must be an integer in 1..8"),
    ("rtn", {"group_size": 0}, "group_size must be a positive integer"),
    ("rtn", {"group_size": 20}, "group_size 20 does not divide in_features 576"),
    ("gptq", {"calib_samples": 0}, "needs calibration data"),
    ("awq", {"calib_samples": 0}, "needs calibration data"),
    ("gptq", {"calib_data": "c4"}, "calib_data must be one of mixed, docstrings, prose"),
    ("fmpq", {"calib_data": "c4"}, "calib_data must be one of mixed, docstrings, prose"),
    ("fmpq", {"block_size": 0}, "block_size must be a positive integer"),
    ("slim", {"criterion": "mse"}, "criterion must be kl"),
    ("rtn", {"targets": "vision"}, "no 'vision' linears"),
    ("rtn", {"targets": "lm"}, "targets must be one of llm, vision, all"),
    ("act_quant", {"act_bits": 16}, "act_bits must be an integer in 1..8"),
    ("kivi", {"bits": 3}, "bits must be one of 1, 2, 4, 8"),
])
def test_invalid_configs_get_clear_errors(smol, name, params, match):
    with pytest.raises(MethodError, match=match):
        mmlab.run(smol, "Hi", [get(name, **params)], max_new_tokens=1)


def test_default_group_falls_back_to_the_largest_power_of_two_that_divides(smol):
    """The papers' group of 128 does not divide SmolLM2's 576: the run takes 64 and says so."""
    tr = mmlab.run(smol, "Hi", [get("rtn")], max_new_tokens=1)
    assert tr.extra["group_size"] == 64 and tr.extra["group_size_asked"] == 128
    explicit = quantized_weights(smol, get("rtn", group_size=64))
    default = quantized_weights(smol, get("rtn"))
    assert all(torch.equal(default.weights[n], w) for n, w in explicit.weights.items())
    assert "group_size" not in mmlab.run(smol, "Hi", [get("rtn", group_size=64)], max_new_tokens=1).extra


def test_calibration_windows_never_read_the_perplexity_text(smol):
    """Perplexity reads the offline corpus from its start; the mixed calibration set draws from its
    second half and the language reference, the docstring set from its tail; both reproducible."""
    from mmlab.data.text import calibration_windows, reference_corpus

    tok = smol.tokenizer
    ids = tok(mmlab.data.offline_corpus(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    head = {tuple(ids[i:i + 8].tolist()) for i in range(0, 16 * 512, 8)}
    for data in ("mixed", "docstrings"):
        wins = calibration_windows(tok, 6, 256, data)
        assert len(wins) == 6 and all(len(w) == 256 for w in wins)
        assert all(torch.equal(a, b) for a, b in zip(wins, calibration_windows(tok, 6, 256, data)))
        grams = {tuple(w[i:i + 8].tolist()) for w in wins for i in range(0, 248)}
        assert len(grams & head) < 3  # (common 8-token phrases aside)
    mixed, ref = calibration_windows(tok, 6, 256, "mixed"), reference_corpus()
    assert all(tok.decode(w) in ref for w in mixed[1::2])  # every other window: the language reference
    prose = mmlab.data.prose_corpus()
    start = tok.decode(tok(prose, add_special_tokens=False).input_ids[:4096])
    for w in calibration_windows(tok, 4, 256, "prose"):  # the diagnostic set: never the prose's start
        assert tok.decode(w) in prose and tok.decode(w) not in start


def test_composition_errors(smol):
    with pytest.raises(MethodError, match="one weight quantization method per run"):
        mmlab.run(smol, "Hi", [get("rtn"), get("gptq")], max_new_tokens=1)
    with pytest.raises(MethodError, match="list it last"):
        mmlab.run(smol, "Hi", [get("kivi"), get("h2o", budget=0.5)], max_new_tokens=1)
    with pytest.raises(MethodError, match="unknown torchao scheme"):
        torchao_quantize(smol, "int4_gpu")


def test_random_architectures_quantize(random_bundles, test_samples):
    for arch, b in random_bundles.items():
        sample = test_samples[0] if b.multimodal else "what color is the circle ?"
        m = get("rtn", bits=4, group_size=None, targets="all" if b.multimodal else "llm")
        tr = mmlab.run(b, sample, [m], max_new_tokens=2)
        assert tr.extra["quantized_linears"] == len(WeightContext(b, m.targets).linears)


def test_activation_quantization_composes_with_any_weight_method(smol):
    """`act` + a weight method in one run: RTN-8 weights + 8-bit activations is exactly the fused
    act_quant; GPTQ-4 + 4-bit activations + KIVI-4 (W4A4KV4) runs as one list; hooks leave after."""
    from mmlab.methods import parse

    text = mmlab.data.offline_corpus()
    kw = dict(window=128, max_windows=1, progress=False)
    fused = mmlab.perplexity(smol, text, parse("act_quant(bits=8, act_bits=8)"), **kw).perplexity
    composed = mmlab.perplexity(smol, text, parse("rtn(bits=8, group_size=None, sym=True)+act(act_bits=8)"), **kw)
    assert composed.perplexity == fused
    w4a4kv4 = parse("gptq(bits=4, group_size=64, calib_samples=2, calib_len=128)+act(act_bits=4)+kivi(bits=4, "
                    "residual=32)")
    r = mmlab.perplexity(smol, text, w4a4kv4, window=128, context=96, max_windows=1, progress=False)
    assert r.perplexity > 0 and r.weight_bits < 5
    assert not smol.decoder.layers[0].self_attn.q_proj._forward_pre_hooks
    with pytest.raises(mmlab.MethodError, match="one activation quantization method per run"):
        mmlab.run(smol, "Hi", parse("act(act_bits=8)+act_quant"), max_new_tokens=1)
    with pytest.raises(mmlab.MethodError, match="hooked in around the engine"):
        mmlab.engine.run(smol, "Hi", parse("act(act_bits=8)"), max_new_tokens=1)


def test_fmpq_permutes_outlier_channels_into_high_precision_blocks():
    """COMET's FMPQ on a hand-checkable input: 6 channels, blocks of 2, high_fraction 1/3 -> one
    block at 8 bits holding the two largest-magnitude channels (3 and 1); the others at 4 bits
    in two blocks of their original order (0, 2) and (4, 5), each with its own per-token scale."""
    from mmlab.methods.quant import FMPQ, fmpq_order, per_token

    absmax = torch.tensor([1.0, 5.0, 2.0, 9.0, 3.0, 0.5])
    perm, n_high = fmpq_order(absmax, block_size=2, high_fraction=1 / 3)
    assert perm.tolist() == [3, 1, 0, 2, 4, 5] and n_high == 2
    assert fmpq_order(absmax, 2, 0.0)[1] == 0 and fmpq_order(absmax, 2, 1.0)[1] == 6
    assert fmpq_order(torch.arange(576.0), 128, 0.16)[1] == 128  # ceil(0.16 x 4.5 blocks) = 1 block
    x = torch.tensor([[0.9, -4.7, 1.3, 8.2, -2.9, 0.1]])
    q = FMPQ(block_size=2, high_fraction=1 / 3).quantize_activation(x, (perm, torch.argsort(perm), n_high))
    want = torch.empty_like(x)
    want[:, [3, 1]] = per_token(x[:, [3, 1]], 8)
    want[:, [0, 2]] = per_token(x[:, [0, 2]], 4)
    want[:, [4, 5]] = per_token(x[:, [4, 5]], 4)
    assert torch.equal(q, want)
    assert (q - x).abs()[:, [3, 1]].max() < 8.2 / 127  # the outliers keep 8-bit resolution
    with pytest.raises(mmlab.MethodError, match="high_fraction must be in"):
        mmlab.run(mmlab.load("smollm2-135m"), "Hi", [FMPQ(high_fraction=1.5)], max_new_tokens=1)


def test_fmpq_rescues_4bit_activations_and_composes_into_w4a4kv4(smol):
    """Per-token 4-bit activations wreck smollm2; FMPQ (outlier blocks at 8 bits, calibrated on
    other text) stays within a few percent of 8-bit activations; GPTQ-4 + FMPQ + KIVI-4 runs as one."""
    from mmlab.methods import parse

    text = mmlab.data.offline_corpus()
    kw = dict(window=128, max_windows=1, progress=False)
    runs = ["act(act_bits=8)", "act(act_bits=4)", "fmpq(calib_samples=2, calib_len=128)"]
    a8, a4, fm = (mmlab.perplexity(smol, text, parse(s), **kw).perplexity for s in runs)
    assert a4 > 5 * a8 and fm < 1.5 * a8
    w4axkv4 = parse("gptq(bits=4, group_size=64, calib_samples=2, calib_len=128)+fmpq(calib_samples=2, "
                    "calib_len=128)+kivi(bits=4, residual=32)")
    r = mmlab.perplexity(smol, text, w4axkv4, window=128, context=96, max_windows=1, progress=False)
    assert r.perplexity < 2 * fm and r.weight_bits < 5
    assert not smol.decoder.layers[0].mlp.down_proj._forward_pre_hooks
