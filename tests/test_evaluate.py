import math

import pytest
import torch

import mmlab
from mmlab.data.text import offline_corpus


def test_tiny_llava_has_learned_and_pruning_hurts(tiny):
    samples = mmlab.data.shapes(n=48, seed=0, split="test")
    dense = mmlab.evaluate(tiny, samples, progress=False)
    pruned = mmlab.evaluate(tiny, samples, [mmlab.methods.get("random", keep_ratio=0.1)], progress=False)
    assert dense.accuracy >= 0.85, dense.by_type
    assert set(dense.by_type) == {"color", "count", "position", "small"}
    assert pruned.accuracy <= dense.accuracy - 0.1, (dense.accuracy, pruned.accuracy)
    assert pruned.flops < dense.flops and pruned.kv_bytes < dense.kv_bytes
    assert len(dense.to_frame()) == 48 and "acc_count" in dense.metrics()


def test_perplexity_real_text(smol):
    text = offline_corpus()
    r = mmlab.perplexity(smol, text, window=128, max_windows=2, progress=False)
    assert r.n_tokens == 2 * 127 and 1 < r.perplexity < 100  # a real LM on English prose


def test_continuation_perplexity_equals_the_full_prefill_nll(smol):
    """With no method, prefilling the context and scoring the rest teacher-forced over its cache gives
    the NLL one full-window prefill gives on the same tokens."""
    text = offline_corpus()
    c = mmlab.perplexity(smol, text, window=128, context=64, max_windows=2, progress=False)
    ids = smol.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0, :256].view(2, 128)
    nll = []
    for chunk in ids:
        logits = mmlab.prefill(smol, mmlab.Inputs(chunk[None]), all_logits=True).logits
        nll.append(torch.nn.functional.cross_entropy(logits[63:127], chunk[64:], reduction="sum"))
    assert c.n_tokens == 2 * 64
    assert c.nll == pytest.approx(float(sum(nll)) / 128, abs=1e-4)
    assert c.perplexity == pytest.approx(math.exp(float(sum(nll)) / 128), rel=1e-4)


def test_perplexity_bad_input(smol, tiny):
    with pytest.raises(mmlab.MethodError, match="context must be"):
        mmlab.perplexity(smol, offline_corpus(20000), window=128, context=128)
    with pytest.raises(mmlab.MethodError, match="fewer than one window"):
        mmlab.perplexity(smol, "too short", window=128)
    with pytest.raises(mmlab.MethodError, match="text LM"):
        mmlab.perplexity(tiny, "x", window=8)


def test_timings_come_with_their_spread():
    """Interquartile range over median: a busy machine's timings are flagged by it, not read as results."""
    import statistics

    from mmlab.evaluate import spread

    assert spread([10.0] * 5) == 0 and math.isnan(spread([1.0, 2.0, 3.0]))
    vals = [10.0, 11.0, 10.5, 50.0, 10.2, 9.9, 10.1, 60.0]
    q1, _, q3 = statistics.quantiles(vals, n=4)
    assert spread(vals) == pytest.approx((q3 - q1) / statistics.median(vals)) and spread(vals) > 0.5
