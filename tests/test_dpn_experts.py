"""DPN's trained pooling experts (``dpn_experts``, ``mmlab train-tiny --dpn``): the engine against an eager loop
reference of the official inference rule, the training forward against the engine, the official hinge loss
and redraw rule on fixed inputs, the shipped tiny-llava-dpn, errors, and training end to end."""

import pytest
import torch
import torch.nn.functional as F

import mmlab
from mmlab.methods.token_pruning import DPN_KERNELS, DPN_LAYERS, PoolingRouters
from mmlab.tiny.dpn import choose_expert, dpn_forward, hinge_loss, pool_sample, train_dpn

get = mmlab.methods.get


@pytest.fixture(scope="module")
def deep():
    """tiny-llava-deep with seeded random routers (so the argmax varies across samples)."""
    bundle = mmlab.load("tiny-llava-deep")
    torch.manual_seed(3)
    bundle.extras["dpn"] = PoolingRouters(bundle.dims()["hidden"], DPN_LAYERS, DPN_KERNELS).eval()
    return bundle


def embeds_of(bundle, sample):
    """(1, n, d) input embeddings with the image's projected features in place, and where the image starts."""
    inp = bundle.encode(sample)
    model = bundle.model
    h = model.get_input_embeddings()(inp.input_ids)
    feats = model.model.get_image_features(inp.model_kwargs()["pixel_values"], vision_feature_layer=-2,
                                           vision_feature_select_strategy="default").pooler_output[0]
    start = int(torch.nonzero(inp.input_ids[0] == model.config.image_token_id)[0])
    h[0, start:start + feats.shape[0]] = feats
    return h, start


def loop_reference(bundle, sample, scale: bool = True):
    """The official inference rule written out: layer by layer; after layers 3, 6, 9 of 12 the router on the last
    token's hidden state gives softmax(logits / 10), its argmax kernel max-pools the grid (F.max_pool2d) and the
    visual tokens are multiplied by that probability; each pooled token at its window's top-left position (ours).
    Returns the last token's logits and the kernels chosen."""
    lm, routers = bundle.model.model.language_model, bundle.extras["dpn"]
    with torch.no_grad():
        h, start = embeds_of(bundle, sample)
        pos, side, chosen = torch.arange(h.shape[1])[None], 12, []
        for i, layer in enumerate(lm.layers):
            h = layer(h, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
            h = h[0] if isinstance(h, tuple) else h
            if i not in (3, 6, 9) or side * side < 16:
                continue
            stage = (3, 6, 9).index(i)
            p = torch.softmax(routers.routers[stage].mlp(h[0, -1]) / 10, -1)
            k = DPN_KERNELS[stage][int(p.argmax())]
            end = start + side * side
            vis = h[:, start:end].transpose(1, 2).reshape(1, -1, side, side)
            vpos = pos[:, start:end].view(side, side)
            if k > 1:
                vis, vpos, side = F.max_pool2d(vis, k, k), vpos[::k, ::k][:side // k, :side // k], side // k
            vis = vis.flatten(2).transpose(1, 2) * (p.max() if scale else 1)
            h = torch.cat([h[:, :start], vis, h[:, end:]], 1)
            pos = torch.cat([pos[:, :start], vpos.reshape(1, -1), pos[:, end:]], 1)
            chosen.append(k)
        return bundle.model.lm_head(lm.norm(h))[0, -1], chosen


def test_engine_equals_the_loop_reference(deep, test_samples):
    seen = set()
    for s in test_samples[:6]:
        ref, chosen = loop_reference(deep, s)
        tr = mmlab.run(deep, s, [get("dpn_experts")], max_new_tokens=1)
        assert [k for _, k in tr.extra["dpn_kernels"]] == chosen
        assert (tr.logits - ref).abs().max().item() <= 1e-4
        seen.update(chosen)
        if chosen[0] > 1:  # the pyramid's token counts after each pooling, in the Trace
            assert tr.image_tokens_per_layer()[4] == 144 // chosen[0] ** 2 < tr.image_tokens_per_layer()[3]
    assert {1, 2} <= seen  # pooled and unpooled stages both occurred
    # the scaling is part of the rule: without it the reference moves away
    ref, _ = loop_reference(deep, test_samples[0], scale=False)
    assert (mmlab.run(deep, test_samples[0], [get("dpn_experts")], max_new_tokens=1).logits - ref).abs().max() > 1e-3


def test_training_forward_at_argmax_equals_the_engine(deep, test_samples):
    """The training forward (batched, padded) routes and pools as the engine does at inference."""
    from mmlab.tiny.train import encode_qa

    model = deep.model
    for s in test_samples[:3]:
        ids, labels = encode_qa(deep.tokenizer, [(s.question, s.answer)], 144, model.config.mmlab_system_prompt)
        h, start = embeds_of(deep, s)
        full = torch.cat([h, model.get_input_embeddings()(ids[:, h.shape[1]:])], 1)
        with torch.no_grad():
            hidden, lab, states = dpn_forward(model, full, labels, deep.extras["dpn"], start, (12, 12), sample=False)
            at = int((lab[0] >= 0).float().argmax())
            logits = model.lm_head(hidden[0, at - 1])
        tr = mmlab.run(deep, s, [get("dpn_experts")], max_new_tokens=1)
        assert (tr.logits - logits).abs().max().item() <= 1e-4
        assert [DPN_KERNELS[i][e] for i, (_, e) in enumerate(states)] == [k for _, k in tr.extra["dpn_kernels"]]


def test_hinge_loss_is_the_official_formula():
    # argmax scale x max p: expert 1 -> 1 x 0.5, expert 2 -> 2 x 0.7, expert 0 -> 0; hinge 1.5 - mean
    p = [torch.tensor([0.2, 0.5, 0.3], requires_grad=True), torch.tensor([0.1, 0.2, 0.7], requires_grad=True),
         torch.tensor([0.6, 0.4], requires_grad=True)]
    loss = hinge_loss([(x, 0) for x in p])
    assert loss.item() == pytest.approx(1.5 - (0.5 + 1.4 + 0.0) / 3)
    loss.backward()
    assert p[0].grad.tolist() == pytest.approx([0, -1 / 3, 0]) and p[1].grad.tolist() == pytest.approx([0, 0, -2 / 3])
    assert p[2].grad.abs().sum() == 0  # kernel 1 (scale 0) gets no push
    assert hinge_loss([(torch.tensor([0.0, 0.0, 1.0]), 2)]).item() == 0  # clipped at 0 above the margin


def test_training_redraws_experts_that_leave_under_18_tokens():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.1, 0.8])
    draws = {choose_expert(p, (1, 2, 4), 12, 12, True, gen) for _ in range(200)}
    assert draws == {0, 1}  # kernel 4 leaves 9 of 144
    assert {choose_expert(p, (1, 2, 4), 6, 6, True, gen) for _ in range(50)} == {0}  # 36 -> 9 or 2: too few
    assert choose_expert(p, (1, 2, 4), 12, 12, False) == 2  # inference: the argmax, whatever it leaves


def test_pool_sample_keeps_the_length_and_realigns_the_labels():
    torch.manual_seed(0)
    router = PoolingRouters(8, (0.5,), ((1, 2),)).routers[0]
    n, start = 30, 2
    h, pos = torch.randn(n, 8), torch.arange(n)
    lab = torch.full((n,), -100)
    lab[27:29] = torch.tensor([5, 6])  # the answer
    with torch.no_grad():
        h2, pos2, lab2, grid, (p, e) = pool_sample(h, pos, lab, (4, 4), start, router, (2, 2), sample=False)
    assert h2.shape == h.shape and grid == (2, 2)
    assert pos2[:start + 4].tolist() == [0, 1, 2, 4, 10, 12]  # each window's top-left cell
    assert lab2[27 - 12:29 - 12].tolist() == [5, 6] and (lab2 >= 0).sum() == 2
    assert torch.equal(h2[-12:], torch.zeros(12, 8))  # zero padding at the end
    window = h[start:start + 16].view(4, 4, 8)[:2, :2].amax((0, 1))
    assert torch.allclose(h2[start], window * p[e])


def test_random_routing_keep_everything_and_errors(deep, test_samples):
    s = test_samples[0]
    plain = mmlab.load("tiny-llava-deep")  # no routers
    official = get("dpn_experts", routing="random", scale=False, seed=1)  # the official random mode: no routers
    tr, again = (mmlab.run(plain, s, [official], max_new_tokens=1) for _ in range(2))
    assert tr.extra["dpn_kernels"] == again.extra["dpn_kernels"] and tr.extra["dpn_kernels"]
    scaled = mmlab.run(deep, s, [get("dpn_experts", routing="random", seed=1)], max_new_tokens=1)
    assert scaled.extra["dpn_kernels"] == tr.extra["dpn_kernels"]  # the same draws, now scaled by the router
    assert (scaled.logits - tr.logits).abs().max() > 1e-3
    for spec in ("dpn_experts", "dpn_experts(routing='random')"):  # the router's choice or its scale
        with pytest.raises(mmlab.MethodError, match="needs trained pooling routers.*tiny-llava-dpn"):
            mmlab.run(plain, s, spec)
    with pytest.raises(mmlab.MethodError, match="routers were trained for layers"):
        mmlab.run(deep, s, [get("dpn_experts", layers=(0.25, 0.5), kernels=((1, 2), (1, 2)))])
    with pytest.raises(mmlab.MethodError, match="kernels must give each pooling layer"):
        get("dpn_experts", kernels=((1, 2),))
    with pytest.raises(mmlab.MethodError, match="routing 'router' or 'random'"):
        get("dpn_experts", routing="best")
    with pytest.raises(mmlab.MethodError, match="scale True or False"):
        get("dpn_experts", scale=0.5)
    with pytest.raises(mmlab.MethodError, match="fewer distinct layers"):
        mmlab.run(mmlab.load("tiny-llava"), s, [get("dpn_experts", routing="random", scale=False)])
    assert get("dpn_experts", layers=()).keeps_everything()


def test_shipped_tiny_llava_dpn_routes(test_samples):
    b = mmlab.load("tiny-llava-dpn")
    assert b.extras["dpn"].kernels == DPN_KERNELS
    tr = mmlab.run(b, test_samples[0], [get("dpn_experts")], max_new_tokens=1)
    assert tr.extra["dpn_kernels"] and tr.answer


def test_composes_with_kv_compression_and_weight_quantization(test_samples):
    """The pooled pyramid's layers hold different lengths; SnapKV's budget then applies per layer, over W4 weights."""
    b = mmlab.load("tiny-llava-dpn")
    tr = mmlab.run(b, test_samples[0], "dpn_experts+snapkv(budget=0.5, window=4)+rtn(bits=4, group_size=32)")
    assert tr.answer and tr.extra["weight_bits"] < 5 and tr.extra["dpn_kernels"]
    assert tr.kv_lengths_final == [n // 2 for n in tr.kv_lengths_prefill]
    assert tr.kv_lengths_prefill[-1] < tr.kv_lengths_prefill[0]  # pooled after an early layer


def test_train_dpn_end_to_end(tmp_path):
    from mmlab.models import load_pooling_routers

    out = train_dpn(steps=2, batch_size=4, out=tmp_path)
    r = load_pooling_routers(out)
    assert r.layers == DPN_LAYERS and (out / "model.safetensors").exists()
    b = mmlab.load("tiny-llava-deep")
    assert not torch.equal(r.routers[0].mlp[1].weight, PoolingRouters(b.dims()["hidden"], DPN_LAYERS,
                                                                        DPN_KERNELS).routers[0].mlp[1].weight)
