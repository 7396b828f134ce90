"""Ground truth: engine (no method, and every method at keep-everything) vs plain transformers.

Prints max |logit diff| of the last prompt token and whether the greedy answers are
identical, for tiny-llava, smollm2-135m and a tiny random model of each supported
architecture. Target: <= 1e-4 and identical answers everywhere.
"""

import sys

import torch

import mmlab
from mmlab.testing import ARCHITECTURES, random_bundle

sys.path.insert(0, "tests")
from test_ground_truth import NOOP, TEXT  # noqa: E402  (the keep-everything settings, one source)

torch.set_num_threads(2)


def check(bundle, samples, methods):
    worst, same = 0.0, True
    for s in samples:
        tr = mmlab.run(bundle, s, methods)
        worst = max(worst, (tr.logits - bundle.reference_logits(s)).abs().max().item())
        same &= tr.answer == bundle.reference_generate(s)
    return worst, same


def main():
    shapes = mmlab.data.shapes(8, seed=0, split="test")
    texts = ["What is the capital of France?", "Explain what a hash table is in one sentence."]
    bundles = [(mmlab.load("tiny-llava"), shapes), (mmlab.load("smollm2-135m"), texts)]
    bundles += [(b, shapes[:2] if b.multimodal else [TEXT])
                for b in (random_bundle(a) for a in ARCHITECTURES)]
    print("every method at its keep-everything setting (tests/test_ground_truth.py NOOP)")
    print(f"{'model':<20} {'methods':<28} {'max|dlogit|':>12} {'answers':>8}")
    ok = True
    for b, samples in bundles:
        settings = [[]] + [[mmlab.methods.get(n, **p)] for n, p in NOOP.items()
                           if b.multimodal or not mmlab.methods.get(n).needs_image]
        for methods in settings:
            label = ", ".join(m.name for m in methods) or "none"
            try:
                worst, same = check(b, samples, methods)
            except mmlab.MethodError as e:  # a method that refuses this model says so (e.g. pool without a grid)
                print(f"{b.name:<20} {label:<28} {'n/a':>12} {'':>8}  ({e})")
                continue
            ok &= worst <= 1e-4 and same
            print(f"{b.name:<20} {label:<28} {worst:>12.2e} {'same' if same else 'DIFF':>8}")
    print("ground truth:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
