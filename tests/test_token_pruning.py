"""Visual-token pruning / merging: each rule against an independent transcription of the
paper's rule, positions and KV consistency, composition, and the errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import mmlab
from mmlab.methods.base import Method
from mmlab.methods.token_pruning import (
    AIM,
    bipartite_merge,
    divprune_select,
    dpc_knn_merge,
    pagerank_importance,
    pool_shape,
    sparsevlm_raters,
    visionzip_select,
)

get = mmlab.methods.get


def _divprune_reference(x, k):
    """The paper's Algorithm 1 as written: min over the whole selected set at every step."""
    xn = x / x.norm(dim=1, keepdim=True)
    d = 1 - xn @ xn.T
    picks = []
    for i in range(k):
        if i == 0:
            scores = d.topk(2, dim=0, largest=False).values[1]
        else:
            scores = d[picks].min(dim=0).values
            scores[picks] = -1  # already chosen (the reference code relies on their 0 self-distance)
        picks.append(int(scores.argmax()))
    return picks


def test_divprune_matches_the_papers_greedy_loop():
    gen = torch.Generator().manual_seed(0)
    for n, k in [(144, 16), (144, 64), (50, 50), (30, 1)]:
        x = torch.randn(n, 24, generator=gen)
        assert divprune_select(x, k).tolist() == _divprune_reference(x, k)


def test_divprune_is_more_diverse_than_random(tiny, test_samples):
    """The Max-Min objective it optimises: the minimum pairwise distance of the kept set."""
    with torch.no_grad():
        f = tiny.adapter.image_features(tiny.encode(test_samples[0]))[0].float()
    d = 1 - F.normalize(f, dim=-1) @ F.normalize(f, dim=-1).T

    def min_dist(idx):
        sub = d[idx][:, idx] + torch.eye(len(idx)) * 9
        return float(sub.min())

    div = min_dist(divprune_select(f, 16))
    rand = max(min_dist(torch.randperm(144, generator=torch.Generator().manual_seed(s))[:16]) for s in range(20))
    assert div > rand


def test_fastv_keeps_the_tokens_eager_attention_ranks_highest(tiny, eager_tiny, test_samples):
    """FastV's choice equals top-k of the stock eager model's layer K-1 attention from the last token."""
    for s in test_samples[:3]:
        inp = tiny.encode(s)
        with torch.no_grad():
            att = eager_tiny(input_ids=inp.input_ids, pixel_values=inp.pixel_values, output_attentions=True).attentions
        for K, keep in [(1, 0.25), (2, 0.11), (3, 0.5)]:
            tr = mmlab.run(tiny, s, [get("fastv", layer=K, keep_ratio=keep)])
            scores = att[K - 1][0, :, -1].mean(0)
            img = torch.nonzero(tr.modality >= 0).flatten()
            k = round(144 * keep)
            expected = set(img[scores[img].topk(k).indices].tolist())
            kept = set(tr.layer_tokens[K].tolist()) & set(img.tolist())
            assert kept == expected
            assert tr.image_tokens_per_layer() == [144] * K + [k] * (4 - K)
            assert tr.kv_lengths_prefill == tr.tokens_per_layer  # the KV cache really holds fewer tokens


class _Probe(Method):
    """Records the positions each layer receives (test helper, not registered)."""

    name = "probe"

    def before_layer(self, ctx, layer, tokens):
        ctx.scratch.setdefault("positions", []).append(tokens.positions[0].clone())


def test_position_conventions(tiny, test_samples):
    s = test_samples[0]
    # inside the LLM: kept tokens keep their original positions
    p = _Probe()
    tr = mmlab.run(tiny, s, [get("fastv", layer=2, keep_ratio=0.25), p], max_new_tokens=1)
    pos = mmlab.engine.prefill(tiny, s, [get("fastv", layer=2, keep_ratio=0.25), p]).ctx.scratch["positions"]
    assert torch.equal(pos[0], torch.arange(tr.prompt_length))
    assert torch.equal(pos[3], tr.layer_tokens[3])  # position == index in the unpruned prompt
    # before the LLM (1-D RoPE): the shortened prompt is renumbered 0..n-1, as LLaVA's code feeds it
    pre = mmlab.engine.prefill(tiny, s, [get("divprune", keep_ratio=0.25), _Probe()]).ctx.scratch["positions"]
    assert torch.equal(pre[0], torch.arange(pre[0].numel())) and pre[0].numel() == 155 - 144 + 36


def test_decoding_after_in_llm_pruning_continues_positions(tiny, test_samples):
    """Decoding resumes at the last prompt position + 1 over per-layer caches of different lengths."""
    pf = mmlab.engine.prefill(tiny, test_samples[1], [get("fastv", layer=1, keep_ratio=0.1)])
    assert int(pf.next_position) == pf.trace.prompt_length
    tr = mmlab.run(tiny, test_samples[1], [get("fastv", layer=1, keep_ratio=0.1)], max_new_tokens=3)
    assert tr.decode_kv_lengths == [] or tr.decode_kv_lengths[0][0] == tr.kv_lengths_prefill[0] + 1


def test_pool_equals_average_pooling(tiny, test_samples):
    with torch.no_grad():
        f = tiny.adapter.image_features(tiny.encode(test_samples[0]))[0]
    pre = mmlab.engine.prefill(tiny, test_samples[0], [get("pool", keep_ratio=0.25), _Probe()])
    tr = pre.trace
    assert tr.image_tokens_per_layer()[0] == 36  # 12x12 -> 6x6, windows of 2x2
    ref = F.avg_pool2d(f.T.reshape(1, -1, 12, 12), 2).reshape(f.shape[1], 36).T
    groups = tr.image_merged_into[0]
    assert torch.bincount(groups).tolist() == [4] * 36
    for slot in range(36):
        assert torch.allclose(f[groups == slot].mean(0), ref[slot], atol=1e-6)
    assert pool_shape(12, 12, 16) == (4, 4) and pool_shape(12, 12, 144) == (12, 12)


def _tome_round_reference(x, r):
    """One bipartite soft-matching round written with loops (ToMe / AIM's merge)."""
    n = x.shape[0]
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    xn = F.normalize(x, dim=-1)
    links = []
    for i in a:
        sims = [float(xn[i] @ xn[j]) for j in b]
        links.append((max(sims), i, b[sims.index(max(sims))]))
    links.sort(key=lambda t: -t[0])
    groups = {j: [j] for j in b}
    kept_a = []
    for rank, (_, i, j) in enumerate(links):
        (groups[j].append(i) if rank < r else kept_a.append(i))
    tokens = {i: x[i] for i in kept_a} | {j: torch.stack([x[m] for m in g]).mean(0) for j, g in groups.items()}
    return [tokens[k] for k in sorted(tokens)], groups


def test_bipartite_merge_matches_loop_reference():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    merged, rep, slot_of = bipartite_merge(x, 14)  # one round, r = 6
    ref, groups = _tome_round_reference(x, 6)
    assert torch.allclose(merged, torch.stack(ref), atol=1e-6)
    assert rep.tolist() == sorted(rep.tolist())
    for j, g in groups.items():
        assert len({int(slot_of[m]) for m in g}) == 1
    # several rounds (at most half the tokens per round) down to the target; every slot has members
    merged, rep, slot_of = bipartite_merge(torch.randn(144, 8), 63)
    assert merged.shape[0] == 63 and sorted(set(slot_of.tolist())) == list(range(63))
    assert all(int(slot_of[r]) == k for k, r in enumerate(rep.tolist()))


def test_aim_schedule_is_the_papers_on_32_layers():
    aim = AIM()
    got = [aim.retention(layer, 32) for layer in range(32)]
    want = [1.0] * 14 + [1 - 0.125 * k for k in range(1, 8)] + [0.0] * 11  # layer 13 on, steps of 0.125
    assert all(math.isclose(g, w, abs_tol=1e-9) for g, w in zip(got, want))


def test_pagerank_importance():
    logits = torch.randn(3, 6, 6).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    one = pagerank_importance(logits, tau=1.0, iters=1)
    m = logits.softmax(-1)
    assert torch.allclose(one, m.mean(1).pow(2).mean(0).sqrt(), atol=1e-6)  # uniform start: column means
    imp = pagerank_importance(logits, tau=0.1, iters=5)
    assert imp.shape == (6,) and bool((imp >= 0).all())


def test_aim_merges_then_prunes_inside(tiny, test_samples):
    tr = mmlab.run(tiny, test_samples[0], [get("aim", keep_ratio=0.4375)])
    assert tr.image_tokens_per_layer() == [63, 63, 39, 0]  # 63 after merging; 62.5% at layer 2; 0 at 3
    assert tr.kv_lengths_prefill == tr.tokens_per_layer
    assert set(tr.image_merged_into[0].tolist()) == set(range(63))
    assert tr.tokens_per_layer[3] == tr.prompt_length - 144  # text always kept


def test_pdrop_stages(tiny, test_samples):
    tr = mmlab.run(tiny, test_samples[0], [get("pdrop", ratio=0.5)])
    assert tr.image_tokens_per_layer() == [144, 72, 36, 18]


def test_methods_compose(tiny, test_samples):
    """A pre-LLM selection followed by in-LLM pruning: each acts on what the other left."""
    s = test_samples[3]
    tr = mmlab.run(tiny, s, [get("divprune", keep_ratio=0.5), get("fastv", layer=2, keep_ratio=0.5)])
    assert tr.image_tokens_per_layer() == [72, 72, 36, 36]
    assert set(tr.layer_tokens[2].tolist()) <= set(tr.layer_tokens[0].tolist())
    assert tr.kv_lengths_prefill == tr.tokens_per_layer and tr.answer
    tr = mmlab.run(tiny, s, [get("pool", keep_ratio=0.25), get("pdrop", ratio=0.5)])
    assert tr.image_tokens_per_layer() == [36, 18, 9, 4]


def test_multi_image_selection_per_image(tiny):
    s = mmlab.data.shapes(2, seed=5)
    sample = {"images": [s[0].image, s[1].image], "question": s[0].question}
    for name in ["divprune", "pool", "aim"]:
        tr = mmlab.run(tiny, sample, [get(name, keep_ratio=0.25)])
        assert set(tr.image_kept) == {0, 1}
        assert tr.image_tokens_per_layer()[0] == 72


@pytest.mark.parametrize("name,params,match", [
    ("fastv", {"keep_ratio": 0}, r"keep_ratio must be in \(0, 1\]"),
    ("divprune", {"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"),
    ("pool", {"keep_ratio": -1}, r"keep_ratio must be in \(0, 1\]"),
    ("aim", {"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
    ("pdrop", {"ratio": 2}, r"ratio must be in \(0, 1\]"),
    ("fastv", {"layer": 4}, r"layer must be an integer in 1..3 .*got 4"),
    ("fastv", {"layer": 0}, r"layer must be an integer >= 1"),
    ("pdrop", {"layers": (0.5, 1.2)}, r"fractions of depth in \(0, 1\)"),
    ("aim", {"prune_from": 0.8, "prune_to": 0.5}, r"prune_to > prune_from"),
    ("aim", {"tau": 0}, r"tau must be > 0"),
])
def test_bad_parameters(name, params, match, tiny, test_samples):
    with pytest.raises(mmlab.MethodError, match=match):
        mmlab.run(tiny, test_samples[0], [get(name, **params)])


@pytest.mark.parametrize("name", ["pool", "divprune", "fastv", "aim", "pdrop"])
def test_image_methods_refuse_text_only_models(name, smol):
    with pytest.raises(mmlab.MethodError, match=f"{name} prunes visual tokens but this input has no image"):
        mmlab.run(smol, "hello", [get(name)])


def test_pool_refuses_models_without_a_grid(random_bundles, test_samples):
    with pytest.raises(mmlab.MethodError, match="pool needs a 2-D visual-token grid"):
        mmlab.run(random_bundles["llava_next"], test_samples[0], [get("pool")])


def _visionzip_official(cls_row, keys, dominant_num, contextual_num):
    """A transcription of the official rule (dvlab-research/VisionZip, visionzip/clip_encoder.py) on one
    image's sequence WITH its [CLS] token at 0: [CLS] + the top dominant_num - 1 patches by [CLS]
    attention are dominant; the rest in sequence order give targets at a stride; every other token
    joins its most cosine-similar target. Returns (dominant set, {target: members}) as sequence indices."""
    n = cls_row.numel()  # patches
    dom = [0] + (cls_row.topk(dominant_num - 1).indices + 1).tolist()
    rest = [i for i in range(n + 1) if i not in dom]
    step = max(1, len(rest) // contextual_num)
    targets = [rest[j] for j in range(0, len(rest), step)][:contextual_num]
    members = {t: [t] for t in targets}
    normed = keys / keys.norm(dim=-1, keepdim=True)
    for i in rest:
        if i not in members:
            sims = [float(normed[i] @ normed[t]) for t in targets]
            members[targets[max(range(len(sims)), key=sims.__getitem__)]].append(i)
    return set(dom), members


def test_visionzip_matches_the_official_rule_on_fixed_inputs():
    """Ours works on the patches only (LLaVA never projects [CLS]): ours(d - 1 dominant) is the official
    rule's (d dominant, [CLS] among them) on every patch, target and merge."""
    gen = torch.Generator().manual_seed(0)
    n, d, c = 48, 9, 4
    cls_row, keys = torch.rand(n, generator=gen), torch.randn(n + 1, 8, generator=gen)
    dom, members = _visionzip_official(cls_row, keys, d, c)
    kept, slot = visionzip_select(cls_row, keys[1:], d - 1, c)
    assert set((kept + 1).tolist()) == (dom - {0}) | set(members)
    for t, group in members.items():
        assert {i for i in range(n) if slot[i] == slot[t - 1]} == {g - 1 for g in group}
    for i in dom - {0}:  # a dominant patch stands alone
        assert (slot == slot[i - 1]).sum() == 1


def test_visionzip_reads_the_towers_own_states(tiny, eager_tiny, test_samples):
    """The tower's feature layer through the projector is the model's image features, bit for bit; the
    [CLS] attention recomputed beside SDPA is eager attention's; at 11% the kept + merged tokens cover
    every patch and the LLM sees 16 tokens."""
    inp = tiny.encode(test_samples[0])
    vs = tiny.adapter.vision_states(inp)[0]
    assert torch.equal(tiny.adapter.project(vs.states[1:]), tiny.adapter.image_features(inp)[0])
    with torch.no_grad():
        out = eager_tiny.model.vision_tower(inp.pixel_values, output_attentions=True, output_hidden_states=True)
    layer = len(out.hidden_states) + tiny.model.config.vision_feature_layer - 1
    assert torch.allclose(vs.cls_attention, out.attentions[layer][0, :, 0, 1:].sum(0), atol=1e-5)
    tr = mmlab.run(tiny, test_samples[0], [mmlab.methods.get("visionzip", keep_ratio=0.11)])
    assert tr.image_tokens_per_layer()[0] == 16 and (tr.image_merged_into[0] >= 0).all()
    assert torch.equal(tr.image_merged_into[0].unique(), torch.arange(16))


def _dpc_knn_official(x, k):
    """The official ``cluster_and_merge`` clustering step (Gumpest/SparseVLMs, utils.py), written as a
    loop over tokens; its 1e-6 random tie-breaking noise is replaced by ours (on an exact tie in density,
    e.g. two mutual nearest neighbours with k = 2, the lower index is the denser)."""
    n, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in dist]
    dmax = max(max(row) for row in dist)
    denser = [[density[j] > density[i] or (density[j] == density[i] and j < i) for j in range(n)] for i in range(n)]
    parent = [min([dist[i][j] for j in range(n) if denser[i][j]] or [dmax]) for i in range(n)]
    score = [parent[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:k]
    cluster = [min(range(k), key=lambda c: dist[centres[c]][i]) for i in range(n)]
    for c, i in enumerate(centres):
        cluster[i] = c
    return centres, cluster


def test_sparsevlm_clusters_match_the_official_rule_on_fixed_inputs():
    x = torch.randn(23, 6, generator=torch.Generator().manual_seed(3))
    for k in (2, 3, 5):
        centres, cluster = dpc_knn_merge(x, k)
        ref_centres, ref_cluster = _dpc_knn_official(x, k)
        assert centres.tolist() == ref_centres and cluster.tolist() == ref_cluster
    centres, cluster = dpc_knn_merge(x, 1)  # one cluster: every density ties, the first token is the centre
    assert centres.tolist() == [0] and cluster.eq(0).all()


def test_sparsevlm_first_stage_follows_eager_attention(tiny, eager_tiny, test_samples):
    """Raters from the input embeddings, the stage layer's eager attention (head mean, rater mean) ranks
    the visual tokens; the top ones stay, and 1 in 10 of the best 30% of the rest come back as centres.
    Counts on 4 layers (stages after layers 0, 1, 2) at 192/576: 75 kept + 3 recycled, 50 + 1, 28 + 1
    (27.5 rounds to 28)."""
    for s in test_samples[:3]:
        inp = tiny.encode(s)
        with torch.no_grad():
            out = eager_tiny(input_ids=inp.input_ids, pixel_values=inp.pixel_values, output_attentions=True,
                             output_hidden_states=True)
        tr = mmlab.run(tiny, s, [get("sparsevlm")])
        assert tr.image_tokens_per_layer() == [144, 78, 51, 29]
        img = torch.nonzero(tr.modality >= 0).flatten()
        text = torch.arange(int(img[-1]) + 1, tr.prompt_length)
        emb = out.hidden_states[0][0]
        raters = text[sparsevlm_raters(emb[img], emb[text])]
        rel = out.attentions[0][0].mean(0)[raters][:, img].mean(0)
        top = set(img[rel.topk(75).indices].tolist())
        layer1 = set(tr.layer_tokens[1].tolist())
        assert top <= layer1 and len(layer1 & set(img.tolist())) == 78
        assert set(text.tolist()) <= layer1  # text is never dropped


def test_keep_merges_tokens_into_kept_ones():
    from mmlab.engine import Tokens

    h = torch.arange(12.0).reshape(1, 6, 2)
    t = Tokens(h.clone(), torch.arange(6)[None], torch.arange(6), torch.tensor([0, 1, 1, 1, 1, 0]).bool())
    t.keep(torch.tensor([0, 2, 5]), merged_into=torch.tensor([0, -1, 2, 2, 2, 5]))
    assert t.source.tolist() == [0, 2, 5]
    assert torch.equal(t.hidden[0], torch.stack([h[0, 0], h[0, 2:5].mean(0), h[0, 5]]))
    with pytest.raises(mmlab.MethodError, match="each -1 or a kept index"):
        t.keep(torch.tensor([0]), merged_into=torch.tensor([0, 1, -1]))


def test_sparsevlm_composes_with_visionzip_snapkv_and_w4(tiny, test_samples):
    ms = [get("visionzip", keep_ratio=0.5), get("sparsevlm", keep_ratio=0.33), get("snapkv", budget=0.5, window=8),
          get("rtn", bits=4, group_size=32)]
    tr = mmlab.run(tiny, test_samples[0], ms)
    per = tr.image_tokens_per_layer()
    assert per[0] == 72 and per[1] < 72 and per[3] < per[1] and tr.extra["weight_bits"] < 5
    assert sum(tr.kv_lengths_final) < sum(tr.kv_lengths_prefill) and tr.answer


class _Hidden(Method):
    """Records the live hidden states and image mask before one layer (test helper, not registered)."""

    name = "hidden_probe"

    def __init__(self, layer, key):
        self.layer, self.key = layer, key

    def before_layer(self, ctx, layer, tokens):
        if layer == self.layer:
            ctx.scratch[self.key] = (tokens.hidden[0].clone(), tokens.is_image.clone(), tokens.positions.clone())


def test_dpn_max_pools_the_grid_after_its_stage_layers(tiny, test_samples):
    """4 layers: the outputs of layers 1 and 2 are pooled (7/32, 15/32, 23/32 of depth, the last stage
    clipped to the second-to-last layer); each pooled token is F.max_pool2d of its 2 x 2 window and sits
    at the window's top-left position; text passes untouched."""
    tr = mmlab.run(tiny, test_samples[0], [get("dpn")])
    assert tr.image_tokens_per_layer() == [144, 144, 36, 9]
    before, after = _Hidden(2, "before"), _Hidden(2, "after")
    from mmlab.engine import prefill

    p = prefill(tiny, tiny.encode(test_samples[0]), [before, get("dpn"), after])
    (h0, img0, pos0), (h1, img1, pos1) = p.ctx.scratch["before"], p.ctx.scratch["after"]
    grid = h0[img0].T.reshape(1, -1, 12, 12)
    pooled = F.max_pool2d(grid, 2, 2).reshape(h0.shape[1], -1).T
    assert torch.equal(h1[img1], pooled) and torch.equal(h1[~img1], h0[~img0])
    top_left = pos0[..., img0].reshape(12, 12)[::2, ::2].flatten()
    assert torch.equal(pos1[..., img1].flatten(), top_left)


def test_dpn_refuses_what_it_cannot_pool(tiny, test_samples):
    with pytest.raises(mmlab.MethodError, match="do not form whole 12x12 grids"):
        mmlab.run(tiny, test_samples[0], [get("divprune", keep_ratio=0.5), get("dpn")])
    with pytest.raises(mmlab.MethodError, match="kernel must be an integer >= 1"):
        get("dpn", kernel=0)
