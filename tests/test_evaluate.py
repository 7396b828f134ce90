import math

import pytest

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
    # continuation mode with no method scores the same tokens the same way
    full = mmlab.perplexity(smol, text, window=128, max_windows=2, progress=False)
    c = mmlab.perplexity(smol, text, window=128, context=64, max_windows=2, progress=False)
    assert c.n_tokens == 2 * 64 and math.isfinite(c.perplexity)
    assert full.perplexity == pytest.approx(r.perplexity)


def test_perplexity_bad_input(smol, tiny):
    with pytest.raises(mmlab.MethodError, match="context must be"):
        mmlab.perplexity(smol, offline_corpus(20000), window=128, context=128)
    with pytest.raises(mmlab.MethodError, match="fewer than one window"):
        mmlab.perplexity(smol, "too short", window=128)
    with pytest.raises(mmlab.MethodError, match="text LM"):
        mmlab.perplexity(tiny, "x", window=8)
