"""Dynamic-LLaVA's decode half: the engine's decode_layer stage against an eager loop reference of the
official rule (a dropped generated token still sees itself, later tokens never see it in layers >= the
sparse layer), the predictor's decisions from the hidden state entering that layer, perplexity through
the decode stages, errors, training end to end (tiny run)."""

import pytest
import torch

import mmlab
from mmlab import engine
from mmlab.arch import Inputs
from mmlab.data import offline_corpus
from mmlab.methods.base import MethodError
from mmlab.methods.kv_cache import TextPredictor
from mmlab.models import load_text_predictor
from mmlab.testing import random_bundle
from mmlab.tiny.dynamic import train_dynamic_text

get = mmlab.methods.get
PROMPT, CONT = 12, 10


@pytest.fixture(scope="module")
def llama():
    b = random_bundle("llama")
    torch.manual_seed(0)
    b.extras["dynamic_llava_text"] = TextPredictor(b.model.config.hidden_size, d_model=32).eval()
    return b


def _ids(bundle):
    return torch.randint(5, bundle.model.config.vocab_size, (1, PROMPT + CONT), generator=torch.Generator()
                         .manual_seed(1))


def _reference(bundle, ids, start: int, kept: torch.Tensor) -> torch.Tensor:
    """Eager loop: every token at once, layer by layer; from layer ``start`` on a continuation token j is a key
    only for itself unless ``kept[j]``. Returns the continuation's logits (CONT, vocab)."""
    lm, n = bundle.model.model, ids.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    key_ok = torch.cat([torch.ones(PROMPT, dtype=torch.bool), kept])
    thinned = (k <= q) & (key_ok[None, :] | (k == q))
    pos = torch.arange(n)[None]
    with torch.no_grad():
        h = lm.embed_tokens(ids)
        pe = lm.rotary_emb(h, pos)
        for i, block in enumerate(lm.layers):
            mask = (thinned if i >= start else (k <= q))[None, None]
            out = block(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        return bundle.model.lm_head(lm.norm(h))[0, PROMPT - 1:-1]


def _entering(bundle, ids, layer: int) -> torch.Tensor:
    """Hidden states entering ``layer`` of the continuation tokens (layers before it see every token)."""
    with torch.no_grad():
        return bundle.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, PROMPT:]


def _decoded(bundle, ids, methods):
    p = mmlab.prefill(bundle, Inputs(ids[:, :PROMPT]), methods)
    logits = engine.teacher_forced(bundle, p, methods, ids[:, PROMPT:])
    return p, torch.cat([p.logits[-1:], logits[:-1]])


def test_decode_eviction_equals_the_eager_reference(llama):
    ids = _ids(llama)
    m = get("dynamic_llava_decode", layer=0.5)
    start = round(0.5 * llama.n_layers)
    with torch.no_grad():
        diff = llama.extras["dynamic_llava_text"](_entering(llama, ids, start))
    diff = diff[:, 0] - diff[:, 1]
    m.margin = float(diff.median())  # about half kept, decided from the hidden state entering the sparse layer
    kept = diff > m.margin
    assert 0 < int(kept.sum()) < CONT
    p, logits = _decoded(llama, ids, [m])
    assert p.trace.extra["decode_kept"] == kept.tolist()
    ref = _reference(llama, ids, start, kept)
    assert (logits[1:] - ref[1:]).abs().max() < 1e-4  # row 0 is the prompt's last logits (prefill)
    lengths = p.cache.lengths()
    assert lengths[:start] == [PROMPT + CONT] * start
    assert lengths[start:] == [PROMPT + int(kept.sum())] * (llama.n_layers - start)
    dense = mmlab.prefill(llama, Inputs(ids[:, :PROMPT]), [])
    engine.teacher_forced(llama, dense, [], ids[:, PROMPT:])
    assert p.cache.nbytes() < dense.cache.nbytes()


def test_random_decisions_follow_the_same_rule(llama):
    ids = _ids(llama)
    m = get("dynamic_llava_decode", layer=0.25, random_keep=0.5)
    p, logits = _decoded(llama, ids, [m])
    kept = torch.tensor(p.trace.extra["decode_kept"])
    assert 0 < int(kept.sum()) < CONT
    ref = _reference(llama, ids, round(0.25 * llama.n_layers), kept)
    assert (logits[1:] - ref[1:]).abs().max() < 1e-4


def test_generation_thins_the_cache_and_keep_everything_is_dense(llama):
    prompt = Inputs(_ids(llama)[:, :PROMPT])
    dense = mmlab.run(llama, prompt, [], max_new_tokens=12)
    noop = mmlab.run(llama, prompt, [get("dynamic_llava_decode", random_keep=1.0)], max_new_tokens=12)
    thin = mmlab.run(llama, prompt, [get("dynamic_llava_decode", layer=0.5, random_keep=0.0)], max_new_tokens=12)
    assert noop.answer_ids == dense.answer_ids and noop.kv_bytes_final == dense.kv_bytes_final
    start = round(0.5 * llama.n_layers)
    steps = len(thin.decode_kv_lengths)
    assert steps >= 3
    # every generated token fed so far but the current one is gone from layers >= start
    assert [row[start] for row in thin.decode_kv_lengths] == [PROMPT + 1] * steps
    assert [row[0] for row in thin.decode_kv_lengths] == [PROMPT + 1 + j for j in range(steps)]
    assert thin.kv_bytes_final < dense.kv_bytes_final


def test_perplexity_decodes_the_continuation(smol):
    text = offline_corpus(4000)
    dense = mmlab.perplexity(smol, text, [], window=48, context=32, max_windows=1, progress=False)
    noop = mmlab.perplexity(smol, text, ["dynamic_llava_decode(random_keep=1.0)"], window=48, context=32,
                            max_windows=1, progress=False)
    none = mmlab.perplexity(smol, text, ["dynamic_llava_decode(random_keep=0.0)"], window=48, context=32,
                            max_windows=1, progress=False)
    assert abs(noop.nll - dense.nll) < 1e-4  # token by token == one block
    assert none.nll != dense.nll
    with pytest.raises(MethodError, match="acts while decoding"):
        mmlab.perplexity(smol, text, ["dynamic_llava_decode"], window=48, max_windows=1, progress=False)


def test_errors():
    with pytest.raises(MethodError, match="random_keep"):
        get("dynamic_llava_decode", random_keep=2)
    with pytest.raises(MethodError, match="fraction of depth"):
        get("dynamic_llava_decode", layer=1.5)
    bare = random_bundle("llama")
    with pytest.raises(MethodError, match="train-tiny --dynamic-text"):
        mmlab.run(bare, "hello there", ["dynamic_llava_decode"], max_new_tokens=2)


def test_training_runs_and_ships_a_loadable_predictor(tmp_path):
    out = train_dynamic_text(steps=2, batch_size=2, prompt=8, answer=50, d_model=32, out=tmp_path)
    extras = load_text_predictor(out)
    assert isinstance(extras["dynamic_llava_text"], TextPredictor)
    assert load_text_predictor(tmp_path / "none") == {}
