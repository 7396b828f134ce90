"""The workbench's ground truth: the engine with no method, and every method at its
keep-everything setting, reproduces the stock transformers forward and generate, on every
architecture; and every attention score a method ranks by equals eager attention's."""

import pytest
import torch

import mmlab
from mmlab.engine import Context
from mmlab.testing import ARCHITECTURES, TEXT_ARCHITECTURES

TOL = 1e-4
get = mmlab.methods.get

# every registered method at its keep-everything setting (adding a method = adding a line here)
NOOP = {
    "random": {"keep_ratio": 1.0},
    "pool": {"keep_ratio": 1.0},
    "divprune": {"keep_ratio": 1.0},
    "visionzip": {"keep_ratio": 1.0},
    "fastv": {"keep_ratio": 1.0},
    "pdrop": {"ratio": 1.0},
    "aim": {"keep_ratio": 1.0, "prune_from": 1.0, "prune_to": 2.0},
    "sparsevlm": {"keep_ratio": 1.0},
    "dpn": {"kernel": 1},
    "dpn_experts": {"layers": ()},  # no pooling layer (it then needs no routers)
    "yopo": {"window": None, "head_keep": 1.0, "layer_cut": 1.0},
    "dynamic_llava": {"keep_ratio": 1.0},
    "dynamic_llava_decode": {"random_keep": 1.0},
    "streamingllm": {"budget": 1.0},
    "h2o": {"budget": 1.0},
    "snapkv": {"budget": 1.0},
    "lookm": {"budget": 1.0},
    "kvmerger": {"budget": 1.0},
    "mod": {"schedule": "constant", "ratio": 1.0},
    "mod_trained": {"ratio": 1.0},  # on the trained checkpoint (it needs the routers it carries)
    # quantization: no target linears / every token in the full-precision window
    "rtn": {"targets": ()},
    "gptq": {"targets": ()},
    "awq": {"targets": ()},
    "slim": {"targets": ()},
    "spqr": {"targets": ()},
    "mixllm": {"targets": ()},
    "act_quant": {"targets": ()},
    "act": {"targets": ()},
    "fmpq": {"targets": ()},
    "kivi": {"residual": 10**9},
}
# a prompt long enough to cross the tiny Gemma3's 6-token sliding window
TEXT = "what color is the circle ? is there a small red shape on the left or right ? how many shapes are there ?"
NO_GRID = {"llava_next", "llava_onevision"}  # anyres tokens: pool refuses them (tested in test_token_pruning)


def test_every_method_has_a_noop_setting():
    assert set(mmlab.methods.available()) == set(NOOP), "add the new method's keep-everything setting to NOOP"


def _check(bundle, sample, methods=()):
    tr = mmlab.run(bundle, sample, methods)
    ref = bundle.reference_logits(sample)
    diff = (tr.logits - ref).abs().max().item()
    assert diff <= TOL, f"{bundle.name} {methods}: max |logit diff| {diff:.2e}"
    assert tr.answer == bundle.reference_generate(sample), f"{bundle.name} {methods}: greedy answer differs"
    return tr


def test_tiny_llava_matches_transformers(tiny, test_samples):
    for s in test_samples[:6]:
        _check(tiny, s)


@pytest.mark.parametrize("name", ["tiny-llava-deep", "smol-llava"])
def test_other_embedded_vlms_match_transformers(name, test_samples):
    bundle = mmlab.load(name)
    for s in test_samples[:4]:
        _check(bundle, s)


@pytest.mark.parametrize("name", sorted(NOOP))
def test_methods_at_keep_everything_match_transformers(name, tiny, smol, test_samples):
    m = get(name, **NOOP[name])
    bundle, samples = (tiny, test_samples[:4]) if m.needs_image else (smol, ["Name a colour."])
    if name == "mod_trained":
        bundle = mmlab.load("tiny-llava-pmod")
    for s in samples:
        _check(bundle, s, [m])


def test_smollm2_matches_transformers(smol):
    for q in ["What is the capital of France?", "Write one sentence about the sea."]:
        tr = _check(smol, q)
        assert len(tr.answer.split()) >= 3  # a real pretrained model answers in words


def _sample(bundle, test_samples):
    return test_samples[1] if bundle.multimodal else TEXT


# the matrix: every architecture x (no method + every method it can run at keep-everything)
MATRIX = [(arch, name) for arch in ARCHITECTURES for name in ["none", *sorted(NOOP)]
          if name != "mod_trained" and not (name in ("pool", "dpn", "dpn_experts") and arch in NO_GRID)
          and not (arch in TEXT_ARCHITECTURES and name != "none" and get(name).needs_image)]


@pytest.mark.parametrize("arch,name", MATRIX)
def test_architecture_matrix_matches_transformers(arch, name, random_bundles, test_samples):
    b = random_bundles[arch]
    _check(b, _sample(b, test_samples), [] if name == "none" else [get(name, **NOOP[name])])


# --- attention scores: recomputed beside SDPA, equal to the eager implementation's weights --------
def _eager_attentions(arch, bundle, sample):
    from mmlab.testing import random_bundle

    eager = random_bundle(arch, attn="eager")  # same seed: the same weights, on eager attention
    assert torch.equal(next(eager.model.parameters()), next(bundle.model.parameters()))
    inp = eager.encode(sample)
    with torch.no_grad():
        return eager.model(input_ids=inp.input_ids, **inp.model_kwargs(), output_attentions=True).attentions


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recomputed_attention_equals_eager(arch, random_bundles, test_samples):
    """Every layer's scores (q_norm, scaling, sliding windows, M-RoPE as each model has them)."""
    b = random_bundles[arch]
    sample = _sample(b, test_samples)
    ref = _eager_attentions(arch, b, sample)
    tr = mmlab.run(b, sample, attention_layers=list(range(b.n_layers)), max_new_tokens=1)
    for i in range(b.n_layers):
        diff = (tr.attentions[i] - ref[i][0]).abs().max().item()
        assert diff <= TOL, f"{arch} layer {i}: max |attention diff| {diff:.2e}"


# each attention-scored method at a setting whose scores are read before anything is removed
SCORED = {"fastv": {"keep_ratio": 0.5}, "pdrop": {}, "aim": {"keep_ratio": 1.0, "prune_from": 0.0, "prune_to": 1.0},
          "mod": {}, "sparsevlm": {"keep_ratio": 0.25},
          "h2o": {"budget": 0.5}, "snapkv": {"budget": 0.5, "window": 4}, "lookm": {"budget": 0.5},
          "kvmerger": {"budget": 0.5}}
SCORED_MATRIX = [(a, n) for a in ARCHITECTURES for n in sorted(SCORED)
                 if not (a in TEXT_ARCHITECTURES and get(n).needs_image)]


@pytest.mark.parametrize("arch,name", SCORED_MATRIX)
def test_scores_each_method_ranks_by_equal_eager_attention(arch, name, random_bundles, test_samples, monkeypatch):
    """A spy on the engine's score recompute: every score a method asks for, on a layer that saw the
    whole prompt, equals the stock eager attention of that layer on the same queries."""
    b = random_bundles[arch]
    sample = _sample(b, test_samples)
    ref = _eager_attentions(arch, b, sample)
    original, checked = Context.attention_logits, []

    def spy(ctx, layer, queries=None):
        logits = original(ctx, layer, queries)
        n = ctx.trace.layer_tokens[layer].numel()
        if n == ctx.trace.prompt_length:
            rows = torch.arange(n)[queries if queries is not None else slice(None)].reshape(-1)
            diff = (logits.softmax(-1) - ref[layer][0][:, rows]).abs().max().item()
            assert diff <= TOL, f"{name} on {arch}, layer {layer}: max |attention diff| {diff:.2e}"
            checked.append(layer)
        return logits

    monkeypatch.setattr(Context, "attention_logits", spy)
    mmlab.run(b, sample, [get(name, **SCORED[name])], max_new_tokens=1)
    assert checked, f"{name} asked for no attention scores on {arch}"


def test_a_model_the_adapter_cannot_score_is_refused_by_name(random_bundles):
    """An attention module the adapter does not know gets one clear line naming the model and the
    method, never silently wrong scores."""
    b = random_bundles["qwen3"]
    attn = b.decoder.layers[1].self_attn
    cls = type(attn)
    attn.__class__ = type("CustomAttention", (cls,), {})
    try:
        with pytest.raises(mmlab.MethodError, match=r"h2o needs attention scores of qwen3 \(CustomAttention\)"):
            mmlab.run(b, TEXT, [get("h2o", budget=0.5)])
        mmlab.run(b, TEXT, [get("streamingllm", budget=0.5)])  # a method that scores nothing still runs
    finally:
        attn.__class__ = cls
