"""Engine overhead: prefill through mmlab's explicit layer loop vs the stock transformers forward.

Same inputs, same weights, logits for the last position only on both sides
(``logits_to_keep=1``), warm-up excluded, median of interleaved repeats. Prints the
ratio engine / transformers; target <= 1.05.
"""

import argparse
import statistics
import time

import torch

import mmlab
from mmlab.models import Inputs


def median_ms(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def compare(bundle, inputs: Inputs, repeats: int):
    kw = inputs.model_kwargs()

    @torch.inference_mode()
    def hf():
        bundle.model(input_ids=inputs.input_ids, logits_to_keep=1, use_cache=True, **kw)

    def ours():
        mmlab.prefill(bundle, inputs)

    for _ in range(3):  # warm-up
        hf(), ours()
    hf_ms, ours_ms = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        hf_ms.append(median_ms(hf, 1))
        ours_ms.append(median_ms(ours, 1))
    return statistics.median(hf_ms), statistics.median(ours_ms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens for smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tiny = mmlab.load("tiny-llava")
    smol = mmlab.load("smollm2-135m")
    from mmlab.data.text import offline_corpus

    ids = smol.tokenizer(offline_corpus(), return_tensors="pt").input_ids[:, : args.context]
    cases = [("tiny-llava (1 image, 144 visual tokens)", tiny, tiny.encode(mmlab.data.shapes(1)[0])),
             (f"smollm2-135m ({args.context} tokens)", smol, Inputs(ids))]
    print(f"{'model':<42} {'transformers ms':>16} {'mmlab ms':>10} {'ratio':>7}")
    for name, b, inp in cases:
        hf, ours = compare(b, inp, args.repeats)
        print(f"{name:<42} {hf:>16.1f} {ours:>10.1f} {ours / hf:>7.3f}")


if __name__ == "__main__":
    main()
