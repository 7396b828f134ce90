"""Dynamic-LLaVA's prefill half: the policy softmax and layer of its training forward against the stock
layer, the trained predictor's top-k selection on live hidden states, training end to end (tiny run)."""

import pytest
import torch

import mmlab
from mmlab.methods.base import Method, MethodError
from mmlab.methods.token_pruning import VisionPredictor
from mmlab.models import load_predictor
from mmlab.tiny.dynamic import policy_layer, softmax_with_policy, train_dynamic

get = mmlab.methods.get


def _official_softmax_with_policy(attn, policy, eps=1e-6):
    """Osilly/dynamic_llava ``softmax_with_policy``, transcribed (policy (B, N, 1))."""
    b, n, _ = policy.size()
    attn_policy = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=attn_policy.dtype).view(1, 1, n, n)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = (attn - max_att).to(torch.float32).exp_() * attn_policy.to(torch.float32)
    return ((attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)).type_as(max_att)


def test_policy_softmax_is_the_official_one():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 7, 7, generator=gen).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -1e9)
    policy = (torch.rand(2, 7, generator=gen) > 0.5).float()
    assert torch.allclose(softmax_with_policy(scores, policy), _official_softmax_with_policy(scores, policy[..., None]))


def test_policy_layer_with_everything_kept_is_the_stock_layer(tiny):
    lm = tiny.model.model.language_model
    h = torch.randn(2, 9, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9).expand(2, -1)
    pe = lm.rotary_emb(h, pos)
    with torch.no_grad():
        ref = lm.layers[1](h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        ref = ref[0] if isinstance(ref, tuple) else ref
        ours = policy_layer(lm.layers[1], h, pe, torch.ones(2, 9))
    assert (ours - ref).abs().max() < 1e-4  # the eps of the policy softmax is the only difference


class _Spy(Method):
    name = "spy"

    def before_layer(self, ctx, layer, tokens):
        ctx.scratch.setdefault("hidden", {})[layer] = (tokens.hidden.clone(), tokens.is_image.clone())


def test_keeps_the_predictors_top_tokens_from_its_layer(test_samples):
    bundle = mmlab.load("tiny-llava-deep")
    m = get("dynamic_llava")
    layer = round(m.layer * bundle.n_layers)
    predictor = bundle.extras["dynamic_llava"]
    for s in test_samples[:2]:
        dense = mmlab.prefill(bundle, s, [_Spy()])
        h, is_img = dense.ctx.scratch["hidden"][layer]
        with torch.no_grad():
            score = torch.log_softmax(predictor(h[:, is_img]), -1)[0, :, 0]
        n_keep = int(144 * 0.2)
        want = torch.nonzero(is_img).flatten()[score.topk(n_keep).indices].sort().values
        tr = mmlab.run(bundle, s, [m], max_new_tokens=1)
        counts = tr.image_tokens_per_layer()
        assert counts[:layer] == [144] * layer and counts[layer:] == [n_keep] * (bundle.n_layers - layer)
        live = tr.layer_tokens[layer]
        assert torch.equal(live[tr.modality[live] >= 0], want)


def test_needs_a_predictor(tiny, test_samples):
    with pytest.raises(MethodError, match="train-tiny --dynamic"):
        mmlab.run(tiny, test_samples[0], [get("dynamic_llava")])
    mmlab.run(tiny, test_samples[0], [get("dynamic_llava", keep_ratio=1.0)], max_new_tokens=1)  # no predictor needed


def test_training_runs_and_ships_a_loadable_predictor(tmp_path, test_samples):
    out = train_dynamic("tiny-llava", steps=2, batch_size=4, d_model=32, out=tmp_path)
    p = load_predictor(out)
    assert isinstance(p, VisionPredictor) and p.dims["d_model"] == 32
    bundle = mmlab.load("tiny-llava")
    bundle.extras["dynamic_llava"] = p
    tr = mmlab.run(bundle, test_samples[0], [get("dynamic_llava", keep_ratio=0.5)], max_new_tokens=1)
    assert tr.image_tokens_per_layer()[-1] == 72
