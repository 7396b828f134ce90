"""Work shared across settings gives exactly what separate runs give: one dense prefill forked for
several KV methods, grids evaluated sample by sample, scores accumulated in chunks of queries."""

import pytest
import torch

import mmlab
from mmlab import engine
from mmlab.evaluate import perplexity_many

get = mmlab.methods.get
PROMPT = ("Alice keeps the spare key under the blue flower pot, and Bob keeps his in the mailbox. "
          "Where does Alice keep the spare key?")
LISTS = [[], [get("h2o", budget=0.5)], [get("snapkv", budget=0.5, window=8)], [get("streamingllm", budget=0.4)],
         [get("lookm", budget=0.3, merge="pivotal")], [get("kvmerger", budget=0.5)],
         [get("h2o", budget=0.5), get("kivi", bits=4, residual=8)], [get("snapkv", budget=0.1)]]  # refused at run time


def _same(shared, alone):
    assert torch.equal(shared.logits, alone.logits) and shared.answer_ids == alone.answer_ids
    assert shared.kv_bytes == alone.kv_bytes and shared.kv_bytes_final == alone.kv_bytes_final
    assert shared.methods == alone.methods
    for a, b in zip(shared.step_logits, alone.step_logits):
        assert torch.equal(a, b)
    kept_a, kept_b = shared.extra.get("kv_kept", {}), alone.extra.get("kv_kept", {})
    assert kept_a.keys() == kept_b.keys() and all(torch.equal(kept_a[k], kept_b[k]) for k in kept_a)


@pytest.mark.parametrize("sample", [PROMPT, "needle"])
def test_forks_of_one_prefill_equal_separate_runs(smol, sample):
    if sample == "needle":  # the question arrives after compression
        sample = mmlab.data.needle(smol.tokenizer, [160], [0.5], 1, seed=3)[0]
    shared = engine.run_many(smol, sample, LISTS, max_new_tokens=6)
    assert len(shared) == len(LISTS)
    for ms, tr in zip(LISTS, shared):
        try:
            alone = mmlab.run(smol, sample, ms, max_new_tokens=6)
        except mmlab.MethodError as e:  # snapkv with a budget below its window: refused the same way
            assert isinstance(tr, mmlab.MethodError) and str(tr) == str(e)
            continue
        _same(tr, alone)


def test_sample_major_grids_equal_one_config_at_a_time(smol, tiny):
    multi = mmlab.data.multi_image(3, 3, seed=1)
    points = mmlab.knob_points(["h2o", "lookm", "snapkv"], [0.5, 0.2])
    g = mmlab.grid(tiny, points, samples=multi, progress=False)
    for cfg, row in zip([{"method": "none"}] + points, g.to_dict("records")):
        ms = [] if cfg["method"] == "none" else [get(cfg["method"], budget=cfg["budget"])]
        try:
            alone = mmlab.evaluate(tiny, multi, ms, progress=False)
        except mmlab.MethodError as e:
            assert row["error"] == str(e)
            continue
        assert row["accuracy"] == alone.accuracy and row["kv_bytes"] == alone.kv_bytes
    text = mmlab.data.offline_corpus()
    lists = [[], [get("h2o", budget=0.5)], [get("kvmerger", budget=0.2)], [get("rtn", bits=3, group_size=64)]]
    many = perplexity_many(smol, text, lists, window=128, context=96, max_windows=2, progress=False)
    for ms, r in zip(lists, many):
        alone = mmlab.perplexity(smol, text, ms, window=128, context=96, max_windows=2, progress=False)
        assert (r.nll, r.kv_bytes, r.n_tokens) == (alone.nll, alone.kv_bytes, alone.n_tokens)


def test_accumulated_attention_in_query_chunks(smol, monkeypatch):
    """A long prompt never holds a heads x n x n map: summed in chunks of queries, the same scores
    (to float rounding) and the same kept tokens."""
    full = mmlab.run(smol, PROMPT, [get("h2o", budget=0.5)], max_new_tokens=1)
    n = full.prompt_length
    monkeypatch.setattr(engine, "SCORE_CHUNK_BYTES", 4 * smol.decoder.config.num_attention_heads * n * 5)  # 5 rows
    p = engine.dense_prefill(smol, PROMPT, [], keep_inputs=True)
    chunked = p.ctx.attention_received(3)
    assert chunked.shape == (smol.decoder.config.num_attention_heads, n)
    assert torch.allclose(chunked, p.ctx.attention(3).sum(1), atol=1e-5)
    assert p.ctx.attention_received(3) is chunked  # memoised
    small = mmlab.run(smol, PROMPT, [get("h2o", budget=0.5)], max_new_tokens=1)
    assert all(torch.equal(small.extra["kv_kept"][k], full.extra["kv_kept"][k]) for k in full.extra["kv_kept"])
