"""KV-cache eviction / merging: each rule against an independent reference (stock eager attention,
Hugging Face's own cache and forward for decoding, loop transcriptions of the merges), real
byte savings, and the errors."""

import pytest
import torch
import torch.nn.functional as F

import mmlab
from mmlab.methods.kv_cache import gaussian_merge, merge_into_kept, merging_sets

get = mmlab.methods.get
PROMPT = ("Alice keeps the spare key under the blue flower pot, and Bob keeps his in the mailbox. "
          "Where does Alice keep the spare key?")


@pytest.fixture(scope="module")
def eager_smol(smol):
    from transformers import AutoModelForCausalLM

    from mmlab.models import cache_dir

    return AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m", attn_implementation="eager").eval()


def _reference_indices(rule, att, n, n_keep, kv_heads):
    """The rule written plainly over the stock model's eager attention (heads, n, n) of one layer."""
    g = att.shape[0] // kv_heads
    out = []
    for h in range(kv_heads):
        a = att[h * g:(h + 1) * g]
        if rule == "streamingllm":
            idx = list(range(4)) + list(range(n - (n_keep - 4), n))
        elif rule == "h2o":  # accumulated attention, half of the budget recent
            recent = n_keep // 2
            score = a.sum(dim=(0, 1))
            heavy = score[: n - recent].topk(n_keep - recent).indices.tolist()
            idx = heavy + list(range(n - recent, n))
        else:  # snapkv, window 8, kernel 5
            w = 8
            score = a[:, n - w:, : n - w].mean(1)
            score = F.avg_pool1d(score[:, None], 5, stride=1, padding=2)[:, 0].mean(0)
            idx = score.topk(n_keep - w).indices.tolist() + list(range(n - w, n))
        out.append(sorted(idx))
    return torch.tensor(out)


@pytest.mark.parametrize("rule,params", [("streamingllm", {}), ("h2o", {}), ("snapkv", {"window": 8})])
def test_decoding_after_compression_matches_a_reference(rule, params, smol, eager_smol):
    """Our compressed cache + decode loop vs the same rule applied to HF's own cache, decoded by HF."""
    from transformers import DynamicCache

    inputs = smol.encode(PROMPT)
    n = inputs.input_ids.shape[1]
    n_keep = int(n * 0.5)
    tr = mmlab.run(smol, PROMPT, [get(rule, budget=0.5, **params)], max_new_tokens=6)

    with torch.no_grad():
        out = eager_smol(input_ids=inputs.input_ids, output_attentions=True, use_cache=True)
        cache = out.past_key_values
        kv_heads = eager_smol.config.num_key_value_heads
        small = DynamicCache()
        for layer in range(eager_smol.config.num_hidden_layers):
            idx = _reference_indices(rule, out.attentions[layer][0], n, n_keep, kv_heads)
            assert torch.equal(idx, tr.extra["kv_kept"][layer]), f"layer {layer}: different tokens kept"
            k, v = cache.layers[layer].keys, cache.layers[layer].values
            gather = idx[None, :, :, None].expand(1, -1, -1, k.shape[-1])
            small.update(k.gather(2, gather), v.gather(2, gather), layer)
        token, ids = int(out.logits[0, -1].argmax()), []
        for step in range(6):  # positions continue from the uncompressed prompt length
            if token in smol.stop_ids:
                break
            ids.append(token)
            o = eager_smol(input_ids=torch.tensor([[token]]), past_key_values=small, use_cache=True,
                           position_ids=torch.tensor([[n + step]]))
            if step < len(tr.step_logits):
                assert (o.logits[0, -1] - tr.step_logits[step]).abs().max() < 1e-3
            token = int(o.logits[0, -1].argmax())
    assert tr.answer_ids == ids[:len(tr.answer_ids)] and len(tr.answer_ids) >= 3


def test_cache_bytes_really_shrink(smol):
    dense = mmlab.run(smol, PROMPT, max_new_tokens=2)
    for name in ["streamingllm", "h2o", "snapkv", "lookm", "kvmerger"]:
        m = get(name, budget=0.5, **({"window": 8} if name == "snapkv" else {}))
        tr = mmlab.run(smol, PROMPT, [m], max_new_tokens=2)
        n = tr.kv_lengths_prefill[0]
        assert tr.kv_lengths_final == [n // 2] * len(tr.kv_lengths_final)
        assert tr.kv_bytes == dense.kv_bytes * (n // 2) // n  # bytes of the tensors held, not a mask
        assert tr.decode_kv_lengths[0] == [n // 2 + 1] * len(tr.kv_lengths_final)


def _merge_reference(keys, values, kept, merge):
    """LOOK-M's merges written with loops: one head, one evicted token at a time. The weighted
    filter is the official one, shared by the heads: the j-th eviction joins when its similarity
    averaged over heads reaches the mean over all heads and evictions."""
    h, n, d = keys.shape[1:]
    per_head = []
    for head in range(h):
        kk, keep = keys[0, head], kept[head].tolist()
        ev = [j for j in range(n) if j not in keep]
        per_head.append(torch.stack([F.cosine_similarity(kk[j][None], kk[keep], dim=-1) for j in ev]).max(-1))
    all_best = torch.stack([b for b, _ in per_head])  # (h, e)
    joins = all_best.mean(0) >= all_best.mean()
    k_out, v_out = [], []
    for head in range(h):
        kk, vv = keys[0, head], values[0, head]
        keep = kept[head].tolist()
        ev = [j for j in range(n) if j not in keep]
        best, target = per_head[head]
        acc_k = [kk[c].clone() for c in keep]
        acc_v = [vv[c].clone() for c in keep]
        cnt = [1.0] * len(keep)
        for e, j in enumerate(ev):
            t = int(target[e])
            if merge == "average":
                acc_k[t] += kk[j]
                acc_v[t] += vv[j]
            elif merge == "pivotal":
                acc_k[t] += (kk[j] + kk[keep[t]]) / 2
                acc_v[t] += (vv[j] + vv[keep[t]]) / 2
            elif joins[e]:  # weighted
                acc_k[t] += best[e] * kk[j]
                acc_v[t] += best[e] * vv[j]
            else:
                continue
            cnt[t] += 1
        k_out.append(torch.stack([a / c for a, c in zip(acc_k, cnt)]))
        v_out.append(torch.stack([a / c for a, c in zip(acc_v, cnt)]))
    return torch.stack(k_out)[None], torch.stack(v_out)[None]


@pytest.mark.parametrize("merge", ["average", "pivotal", "weighted"])
def test_lookm_merges_match_loop_reference(merge):
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 20, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen)
    kept = torch.stack([torch.randperm(20, generator=gen)[:7].sort().values for _ in range(2)])
    k, v, into = merge_into_kept(keys, values, kept, merge)
    rk, rv = _merge_reference(keys, values, kept, merge)
    for h in range(2):  # every merged position points at a kept one; kept positions merge nowhere
        assert set(into[h][into[h] >= 0].tolist()) <= set(kept[h].tolist()) and (into[h][kept[h]] == -1).all()
    assert (into >= 0).any()
    assert torch.allclose(k, rk, atol=1e-5) and torch.allclose(v, rv, atol=1e-5)


def test_lookm_text_prior_keeps_every_text_token(tiny, test_samples):
    """tiny-llava: 144 image + 11 text tokens; at 10% (15 tokens) text and the window go first."""
    pf = mmlab.engine.prefill(tiny, test_samples[0], [get("lookm", budget=0.1)])
    text = set(torch.nonzero(pf.trace.modality < 0).flatten().tolist())
    for idx in pf.trace.extra["kv_kept"].values():
        assert all(text <= set(head.tolist()) for head in idx)
    plain = mmlab.engine.prefill(tiny, test_samples[0], [get("lookm", budget=0.1, text_prior=False)])
    changed = [not torch.equal(a, b) for a, b in zip(pf.trace.extra["kv_kept"].values(),
                                                     plain.trace.extra["kv_kept"].values())]
    assert any(changed)  # the prior is what keeps them: attention alone ranks some image tokens higher


def test_merging_sets_are_runs_of_similar_adjacent_keys():
    base = torch.randn(3, 16)
    keys = torch.stack([base[0], base[0] * 1.1, base[1], base[2], base[2] + 1e-3, base[2]])[None]  # 1 head
    assert merging_sets(keys, 0.99)[0].tolist() == [0, 0, 1, 2, 2, 2]
    assert merging_sets(keys, 1.0)[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_gaussian_merge_matches_formula():
    k, v = torch.randn(6, 4), torch.randn(6, 4)
    score = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.8, 0.05])
    sets = torch.tensor([0, 0, 0, 1, 1, 2])
    kept = torch.tensor([1, 4])
    nk, nv, into = gaussian_merge(k, v, score, kept, sets)
    assert into.tolist() == [1, -1, 1, 4, -1, -1]  # tokens 0 and 2 into 1, token 3 into 4; token 5's set kept nothing
    d2 = torch.stack([(k[0] - k[1]).pow(2).sum(), (k[2] - k[1]).pow(2).sum()])
    w = torch.exp(-d2 / (2 * d2.mean()))
    assert torch.allclose(nk[1], (k[1] + w[0] * k[0] + w[1] * k[2]) / (1 + w.sum()), atol=1e-6)
    assert torch.allclose(nv[4], (v[4] + torch.exp(torch.tensor(-0.5)) * v[3]) / (1 + torch.exp(torch.tensor(-0.5))),
                          atol=1e-6)
    assert torch.equal(nk[0], k[0]) and torch.equal(nk[5], k[5])


def test_kvmerger_without_merging_is_h2o(smol):
    a = mmlab.engine.prefill(smol, PROMPT, [get("kvmerger", budget=0.5, threshold=1.0)])
    b = mmlab.engine.prefill(smol, PROMPT, [get("h2o", budget=0.5)])
    assert all(torch.equal(x, y) for x, y in zip(a.cache.keys, b.cache.keys))
    c = mmlab.engine.prefill(smol, PROMPT, [get("kvmerger", budget=0.5, threshold=0.5)])
    assert sum(c.trace.extra["kv_merged"].values()) > 0
    assert any(not torch.equal(x, y) for x, y in zip(c.cache.keys, b.cache.keys))


def test_compression_composes_with_token_pruning(tiny, test_samples):
    """FastV inside the prefill leaves layers of different lengths; the KV budget applies per layer."""
    tr = mmlab.run(tiny, test_samples[0], [get("fastv", keep_ratio=0.25), get("snapkv", budget=0.5, window=4)])
    assert tr.kv_lengths_final == [n // 2 for n in tr.kv_lengths_prefill]
    assert tr.kv_lengths_prefill[0] > tr.kv_lengths_prefill[3]


@pytest.mark.parametrize("name,params,match", [
    ("h2o", {"budget": 0}, r"budget must be a fraction of the prompt in \(0, 1\]"),
    ("snapkv", {"budget": 1.5}, r"budget must be"),
    ("lookm", {"budget": -3}, r"budget must be"),
    ("kvmerger", {"budget": "half"}, r"budget must be"),
    ("streamingllm", {"budget": True}, r"budget must be"),
    ("snapkv", {"budget": 16, "window": 32}, r"budget of 16 tokens is smaller than the observation window of 32"),
    ("snapkv", {"budget": 0.1, "window": 16}, r"smaller than the 16 tokens the rule always keeps"),
    ("streamingllm", {"budget": 2, "sinks": 4}, r"smaller than the 4 tokens the rule always keeps"),
    ("lookm", {"merge": "max"}, r"merge must be one of none, average, pivotal, weighted"),
    ("kvmerger", {"threshold": 2}, r"threshold is a cosine similarity"),
    ("h2o", {"recent_ratio": 1.0}, r"h2o: recent_ratio must be in \[0, 1\)"),
])
def test_bad_parameters(name, params, match, smol):
    with pytest.raises(mmlab.MethodError, match=match):
        mmlab.run(smol, PROMPT, [get(name, **params)], max_new_tokens=1)
