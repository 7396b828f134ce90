"""The workbench's ground truth: the engine with no method, and every method at its
keep-everything setting, reproduces the stock transformers forward and generate."""

import pytest

import mmlab
from mmlab.testing import ARCHITECTURES

TOL = 1e-4

# every registered method at its keep-everything setting (adding a method = adding a line here)
NOOP = {
    "random": {"keep_ratio": 1.0},
    "pool": {"keep_ratio": 1.0},
    "divprune": {"keep_ratio": 1.0},
    "fastv": {"keep_ratio": 1.0},
    "pdrop": {"ratio": 1.0},
    "aim": {"keep_ratio": 1.0, "prune_from": 1.0, "prune_to": 2.0},
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
    "kivi": {"residual": 10**9},
}


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


@pytest.mark.parametrize("name", sorted(NOOP))
def test_methods_at_keep_everything_match_transformers(name, tiny, smol, test_samples):
    m = mmlab.methods.get(name, **NOOP[name])
    bundle, samples = (tiny, test_samples[:4]) if m.needs_image else (smol, ["Name a colour."])
    if name == "mod_trained":
        bundle = mmlab.load("tiny-llava-pmod")
    for s in samples:
        _check(bundle, s, [m])


def test_smollm2_matches_transformers(smol):
    for q in ["What is the capital of France?", "Write one sentence about the sea."]:
        tr = _check(smol, q)
        assert len(tr.answer.split()) >= 3  # a real pretrained model answers in words


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_architectures_match_transformers(arch, random_bundles, test_samples):
    b = random_bundles[arch]
    _check(b, test_samples[0] if b.multimodal else "what color is the circle ?")


IMAGE_METHODS = [n for n in sorted(NOOP) if mmlab.methods.get(n).needs_image and n != "mod_trained"]


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_random_multimodal_keep_everything(arch, name, random_bundles, test_samples):
    if name == "pool" and arch == "llava_next":
        pytest.skip("LLaVA-NeXT tiles have no single token grid; pool refuses it (tested in test_token_pruning)")
    _check(random_bundles[arch], test_samples[1], [mmlab.methods.get(name, **NOOP[name])])
