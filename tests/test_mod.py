"""Mixture-of-Depths routing: schedules, real KV / FLOPs savings, routing semantics, ARank, errors."""

import math

import pytest
import torch

import mmlab
from mmlab.flops import layer_flops
from mmlab.methods.mod import attention_rank, mean_retention, prd_ratio

get = mmlab.methods.get


def test_prd_schedule_is_p_mods():
    r = [prd_ratio(i, 32) for i in range(32)]
    assert math.isclose(mean_retention(r), 0.5375, abs_tol=1e-9)
    assert r[:8] == [1.0] * 8 and r[-8:] == [0.15] * 8  # dense early layers, floored late ones
    assert all(a >= b for a, b in zip(r, r[1:]))


def test_routing_shrinks_kv_and_flops_as_the_schedule_says(tiny, test_samples):
    dense = mmlab.run(tiny, test_samples[0])
    m = get("mod", schedule="constant", ratio=0.5)
    tr = mmlab.run(tiny, test_samples[0], [m])
    n_text = dense.prompt_length - 144
    expect = [n_text + int(144 * r) for r in m.ratios(4)]
    assert tr.tokens_per_layer == expect and tr.kv_lengths_prefill == expect
    assert tr.kv_bytes == dense.kv_bytes * sum(expect) // (4 * dense.prompt_length)
    d = tr.dims
    analytic = sum(layer_flops(n, n, d["hidden"], d["q_dim"], d["kv_dim"], d["ffn"]) for n in expect)
    assert tr.flops["prefill"] == analytic + 2 * d["hidden"] * d["vocab"]


def test_skipped_tokens_ride_the_residual_and_return_later(tiny, test_samples):
    """A token skipped at layer 1 is processed again at layer 2 with its layer-1 input unchanged."""

    class Probe(mmlab.methods.Method):
        name = "probe"

        def before_layer(self, ctx, layer, tokens):
            ctx.scratch.setdefault("h", {})[layer] = (tokens.source.clone(), tokens.hidden[0].clone())

    p = mmlab.engine.prefill(tiny, test_samples[0], [get("mod", layers=(1,), ratio=0.25), Probe()])
    src1, h1 = p.ctx.scratch["h"][1]
    src2, h2 = p.ctx.scratch["h"][2]
    assert torch.equal(src1, src2)  # nobody was removed
    processed = set(p.trace.layer_tokens[1].tolist())
    skipped = torch.tensor([s not in processed for s in src1.tolist()])
    assert skipped.sum() == 144 - 36
    assert torch.equal(h1[skipped], h2[skipped]) and not torch.allclose(h1[~skipped], h2[~skipped])
    assert p.trace.layer_tokens[2].numel() == p.trace.prompt_length  # back in at layer 2


def test_attention_score_picks_the_most_attended(tiny, eager_tiny, test_samples):
    s = test_samples[1]
    inp = tiny.encode(s)
    with torch.no_grad():
        att = eager_tiny(input_ids=inp.input_ids, pixel_values=inp.pixel_values, output_attentions=True).attentions
    tr = mmlab.run(tiny, s, [get("mod", layers=(2,), ratio=0.25)])
    img = torch.nonzero(tr.modality >= 0).flatten()
    top = set(img[att[1][0, :, -1].mean(0)[img].topk(36).indices].tolist())
    assert set(tr.layer_tokens[2].tolist()) & set(img.tolist()) == top


def test_attention_rank():
    eye = torch.eye(6)[None].repeat(2, 1, 1)
    assert attention_rank(eye) == 0  # only the diagonal: nothing left after zeroing it
    causal = torch.ones(6, 6).tril()
    probs = (causal / causal.sum(-1, keepdim=True))[None]
    assert attention_rank(probs) == 5  # strictly lower-triangular, full rank but the first row


def test_arank_per_layer(tiny, smol, test_samples):
    ranks = mmlab.arank(tiny, test_samples[:2])
    assert len(ranks) == 4 and all(0 < r <= 155 for r in ranks)
    assert len(mmlab.arank(smol, ["Name a colour."])) == 30


def test_arank_needs_recomputable_attention(random_bundles):
    """An attention module the engine cannot recompute scores from (here: an opaque wrapper, as a
    fused-qkv or non-softmax attention would be) gets a clear error, not a crash."""

    class Opaque(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    b = random_bundles["llama"]
    layer = b.decoder.layers[0]
    original = layer.self_attn
    try:
        layer.self_attn = Opaque(original)
        with pytest.raises(mmlab.MethodError, match="Opaque.*cannot recompute"):
            mmlab.arank(b, ["what color is the circle ?"])
    finally:
        layer.self_attn = original


@pytest.mark.parametrize("params,match", [
    ({"ratio": 1.5}, r"ratio must be in \[0, 1\]"),
    ({"min_ratio": -0.1}, r"min_ratio must be in \[0, 1\]"),
    ({"min_ratio": 0.9, "max_ratio": 0.5}, r"min_ratio \(0.9\) is above max_ratio \(0.5\)"),
    ({"schedule": "cosine"}, r"schedule must be one of constant, linear, prd"),
    ({"score": "random"}, r"score must be one of attention, norm"),
    ({"layers": (7,)}, r"layers must be indices in 0..3"),
    ({"schedule": "constant", "start_layer": 0}, r"layer 0 has no previous layer's attention"),
])
def test_bad_schedules(params, match, tiny, test_samples):
    with pytest.raises(mmlab.MethodError, match=match):
        mmlab.run(tiny, test_samples[0], [get("mod", **params)])


def test_trained_routing_in_the_engine_equals_the_training_forward(test_samples):
    """The engine's routed prefill (tokens.route with STRing weights) computes what mod_forward
    trained: same last-token logits on the shipped p-MoD and gamma-MoD checkpoints."""
    from mmlab.tiny.mod import mod_forward

    for name in ("tiny-llava-pmod", "tiny-llava-gmod"):
        b = mmlab.load(name)
        routers = b.extras["mod"]
        for s in test_samples[:3]:
            inp = b.encode(s)
            with torch.no_grad():
                feats = b.adapter.image_features(inp)[0]
                emb = b.decoder.embed_tokens(inp.input_ids)
                emb = torch.cat([emb[:, :3], feats[None], emb[:, 3 + feats.shape[0]:]], 1)
                ref = b.lm_head(mod_forward(b.model, emb, routers, slice(3, 3 + feats.shape[0])))[0, -1]
            tr = mmlab.run(b, s, [get("mod_trained")], max_new_tokens=1)
            assert (tr.logits - ref).abs().max() < 1e-4
            assert tr.image_tokens_per_layer() == [int(144 * r) for r in routers.ratios]


def test_trained_mod_needs_routers(tiny, test_samples):
    with pytest.raises(mmlab.MethodError, match="has none; load tiny-llava-pmod or tiny-llava-gmod"):
        mmlab.run(tiny, test_samples[0], [get("mod_trained")])
