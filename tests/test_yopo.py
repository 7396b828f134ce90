"""YOPO's three cuts against a loop transcription of the rule on an eager forward written out by hand,
the engine's restrict() against transformers, the official local mask, the head budget and the FLOPs."""

import sys

import pytest
import torch

import mmlab
from mmlab.methods.base import Method, MethodError
from mmlab.methods.token_pruning import YOPO, neighbour_mask, yopo_heads
from mmlab.testing import ARCHITECTURES

get = mmlab.methods.get


def _official_local_mask(height, width, window):
    """YOPO's ``LlamaDecoderLayer.local_mask`` (official modeling_llama_prune.py), transcribed."""
    grid_r, grid_c = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    positions = torch.stack([grid_r.flatten(), grid_c.flatten()], dim=1)
    delta = (positions.unsqueeze(1) - positions.unsqueeze(0)).abs()
    return (delta[..., 0] <= int((window - 1) / 2)) & (delta[..., 1] <= int((window - 1) / 2))


@pytest.mark.parametrize("rows,cols,window", [(24, 24, 5), (24, 24, 3), (12, 12, 5), (3, 7, 1), (4, 4, 9)])
def test_neighbour_mask_is_the_official_local_mask(rows, cols, window):
    assert torch.equal(neighbour_mask(rows, cols, window), _official_local_mask(rows, cols, window))


def test_head_budget_keeps_the_first_layers_and_the_most_active_heads():
    act = torch.rand(8, 6, generator=torch.Generator().manual_seed(0))
    kept = yopo_heads(act, keep=0.5, full_layers=2)
    assert kept[:2].all() and int(kept.sum()) == round(0.5 * 48)
    rest, chosen = act[2:], kept[2:]
    assert rest[chosen].min() > rest[~chosen].max()  # nothing dropped reads the image more than a kept head
    assert yopo_heads(act, keep=1.0, full_layers=2).all()
    assert int(yopo_heads(act, keep=0.1, full_layers=2).sum()) == 12  # never fewer than the full layers


def _allowed_reference(modality, grid, window, cut_heads, n_heads):
    """(heads, n, n), entry by entry: text rows causal; visual -> visual only within the window of the
    same image (both directions); in a cut head no visual key, except a visual query's own."""
    n = modality.numel()
    rows, cols = grid
    index = {}  # token -> (image, row, col)
    for k in modality.unique().tolist():
        if k >= 0:
            for j, t in enumerate(torch.nonzero(modality == k).flatten().tolist()):
                index[t] = (k, j // cols, j % cols)
    half = (window - 1) // 2
    out = torch.zeros(n_heads, n, n, dtype=torch.bool)
    for h in range(n_heads):
        for i in range(n):
            for j in range(n):
                if i in index and j in index:
                    (a, r1, c1), (b, r2, c2) = index[i], index[j]
                    ok = a == b and abs(r1 - r2) <= half and abs(c1 - c2) <= half
                else:
                    ok = j <= i
                if cut_heads[h] and j in index:
                    ok = i == j
                out[h, i, j] = ok
    return out


def _reference_logits(bundle, sample, window, heads_kept, cut_layer):
    """The LLM written out eagerly: masked softmax per head, cut heads' visual outputs zeroed, the visual
    tokens dropped (positions kept) from ``cut_layer`` on."""
    ad = bundle.adapter
    inp = bundle.encode(sample)
    with torch.no_grad():
        pr = ad.assemble(inp, ad.image_features(inp), {})
        h, pos, modality = pr.embeds, pr.positions, pr.modality.clone()
        for i, blk in enumerate(ad.layers):
            if i == cut_layer:
                text = modality < 0
                h, pos, modality = h[:, text], pos[..., text], modality[text]
            a, n = blk.self_attn, h.shape[1]
            is_img = modality >= 0
            cut = ~heads_kept[i] if i < (cut_layer or 10**9) else torch.zeros_like(heads_kept[i])
            allowed = _allowed_reference(modality, ad.image_grid(inp), window, cut, cut.numel())
            cos, sin = ad.decoder.rotary_emb(h, pos)
            x = blk.input_layernorm(h)
            q = a.q_proj(x).view(1, n, -1, a.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(1, n, -1, a.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(1, n, -1, a.head_dim).transpose(1, 2)
            q, k = sys.modules[type(a).__module__].apply_rotary_pos_emb(q, k, cos, sin)
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
            p = ((q @ k.transpose(-1, -2)) * a.scaling).masked_fill(~allowed[None], float("-inf")).softmax(-1)
            o = p @ v  # (1, heads, n, head_dim)
            o = o * (~(is_img[None, :] & cut[:, None])).float()[None, :, :, None]
            h = h + a.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            h = h + blk.mlp(blk.post_attention_layernorm(h))
        return ad.logits(h[:, -1:])[-1]


@pytest.mark.parametrize("params", [dict(window=3, head_keep=1.0, layer_cut=1.0),
                                    dict(window=5, head_keep=0.5, layer_cut=1.0, full_head_layers=0),
                                    dict(window=3, head_keep=0.5, layer_cut=0.75, full_head_layers=1)])
def test_yopo_equals_an_eager_loop_reference_of_its_rule(params, test_samples):
    bundle = mmlab.load("tiny-llava")
    mmlab.visual_heads(bundle, mmlab.data.shapes(n=4, seed=1, split="train"))
    m = get("yopo", **params)
    kept = (yopo_heads(bundle.extras["visual_heads"], m.head_keep, m.full_head_layers) if m.head_keep < 1
            else torch.ones(bundle.n_layers, 4, dtype=torch.bool))
    for s in test_samples[:2]:
        tr = mmlab.run(bundle, s, [m], max_new_tokens=1)
        ref = _reference_logits(bundle, s, m.window, kept, m.cut_layer(bundle.n_layers))
        assert (tr.logits - ref).abs().max() < 1e-4
        plain = mmlab.run(bundle, s, max_new_tokens=1).logits
        assert (tr.logits - plain).abs().max() > 1e-3  # the cuts changed something


class _Causal(Method):
    """restrict() with the causal pattern itself (and gates of one): must change nothing."""

    name = "causal_spy"

    def before_layer(self, ctx, layer, tokens):
        n = len(tokens)
        tokens.restrict(torch.ones(1, n, n, dtype=torch.bool, device=tokens.hidden.device).tril(),
                        torch.ones(n, ctx.config.num_attention_heads, device=tokens.hidden.device))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_restrict_with_the_causal_pattern_matches_transformers(arch, random_bundles, test_samples):
    b = random_bundles[arch]
    sample = test_samples[1] if b.multimodal else "what color is the circle ? is there a small red shape on the left ?"
    tr = mmlab.run(b, sample, [_Causal()])
    assert (tr.logits - b.reference_logits(sample)).abs().max() <= 1e-4
    assert tr.answer == b.reference_generate(sample)
    assert abs(tr.flops["prefill_sparse"] - tr.flops["prefill"]) < 1e-6 * tr.flops["prefill"]


def test_cuts_count_their_flops(tiny, test_samples):
    s = test_samples[0]
    dense = mmlab.run(tiny, s, max_new_tokens=1)
    win = mmlab.run(tiny, s, [get("yopo", window=3, head_keep=1.0, layer_cut=1.0)], max_new_tokens=1)
    assert win.flops["prefill"] == dense.flops["prefill"]  # a mask: every token still computed
    assert win.flops["prefill_sparse"] < dense.flops["prefill"]
    assert set(win.restricted) == set(range(tiny.n_layers))
    cut = mmlab.run(tiny, s, [get("yopo", window=None, head_keep=1.0, layer_cut=0.5)], max_new_tokens=1)
    assert cut.image_tokens_per_layer()[2:] == [0, 0] and cut.image_tokens_per_layer()[1] == 144
    assert cut.flops["prefill"] < dense.flops["prefill"] and not cut.restricted


def test_yopo_errors_name_the_fix(tiny, test_samples):
    bundle = mmlab.load("tiny-llava")
    bundle.extras.pop("visual_heads", None)
    with pytest.raises(MethodError, match="mmlab.visual_heads"):
        mmlab.run(bundle, test_samples[0], [get("yopo")])
    with pytest.raises(MethodError, match="odd integer"):
        get("yopo", window=4)
    with pytest.raises(MethodError, match="layer_cut"):
        get("yopo", layer_cut=0.0)
    assert isinstance(get("yopo"), YOPO)


def test_restricted_layers_scores_follow_the_restriction(tiny, test_samples):
    """A method reading a restricted layer's attention gets the probabilities the layer used."""
    s = test_samples[0]
    m = get("yopo", window=3, head_keep=1.0, layer_cut=1.0)
    tr = mmlab.run(tiny, s, [m], attention_layers=[0], max_new_tokens=1)
    inp = tiny.encode(s)
    allowed = _allowed_reference(tr.modality, tiny.adapter.image_grid(inp), 3, torch.zeros(4, dtype=torch.bool), 4)
    p = tr.attentions[0]
    assert torch.all(p[~allowed] == 0) and torch.allclose(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5)
    assert (p[allowed] > 0).all()


def test_neighbourhoods_follow_grid_cells_after_pruning(tiny, test_samples):
    """Tokens pruned before the LLM leave holes: the survivors keep their own cells' neighbourhoods."""
    s = test_samples[0]
    m = get("yopo", window=3, head_keep=1.0, layer_cut=1.0)
    tr = mmlab.run(tiny, s, [get("random", keep_ratio=0.5), m], attention_layers=[0], max_new_tokens=1)
    cells = tr.image_kept[0].sort().values  # the kept tokens' cells, in prompt order
    img = tr.modality[tr.layer_tokens[0]] >= 0  # the live visual tokens of layer 0
    assert int(img.sum()) == 72
    r, c = cells // 12, cells % 12
    near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    p = tr.attentions[0][:, img][:, :, img]
    assert torch.equal(p[0] > 0, near)


def test_yopo_composes_with_pruning_kv_eviction_and_w4(tiny, test_samples):
    for s in test_samples[:2]:
        tr = mmlab.run(tiny, s, [get("fastv", keep_ratio=0.5), get("yopo", head_keep=1.0, layer_cut=0.75),
                                 get("snapkv", budget=0.5, window=2), get("rtn", bits=4)])
        assert tr.answer and tr.kv_lengths_final[0] < tr.kv_lengths_prefill[0]
        assert tr.image_tokens_per_layer() == [144, 144, 72, 0]
