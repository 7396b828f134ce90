"""Model bytes and CPU tokens/s of smollm2-135m under torchao's real kernels, as ratios to FP32.

Rows: FP32; int8 weight-only (Int8WeightOnlyConfig); int8 dynamic activations x int8
weights (Int8DynamicActivationInt8WeightConfig); int4 weight-only (IntxWeightOnlyConfig,
group 32 - on CPU torchao keeps one int4 code per int8 byte, so the bytes do not drop below
int8; packed int4 kernels exist only on GPU); and, for contrast, our fake-quant RTN int4
(de-quantized float weights: the accuracy of int4, the bytes and speed of FP32).
Bytes are those the model's tensors hold (tensor-subclass internals included). Speed is
the median over ``--repeats`` of prefill tokens/s (``--prompt`` tokens) and decode
tokens/s (``--new`` greedy tokens), all in one process, one after another.

    python benchmarks/quant_speed.py [--prompt 256] [--new 32] [--repeats 3] [--threads 2]
"""

import argparse
import statistics

import torch

import mmlab
from mmlab.data.text import offline_corpus
from mmlab.quantize import model_bytes, torchao_quantize


def measure(bundle, prompt, new, repeats, methods=()):
    mmlab.run(bundle, prompt, list(methods), max_new_tokens=4)  # warm-up (and one-time quantization)
    pre, dec = [], []
    for _ in range(repeats):
        tr = mmlab.run(bundle, prompt, list(methods), max_new_tokens=new)
        n = tr.tokens_per_layer[0]
        pre.append(n / tr.timings["prefill_ms"] * 1e3)
        dec.append(1e3 / tr.timings["decode_ms_per_token"])
    return statistics.median(pre), statistics.median(dec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = mmlab.load("smollm2-135m")
    ids = lm.tokenizer(offline_corpus(), add_special_tokens=False).input_ids[: args.prompt]
    prompt = {"prompt": lm.tokenizer.decode(ids)}
    rows = [("fp32", lm, ()),
            ("int8 weight-only (torchao)", torchao_quantize(lm, "int8_weight"), ()),
            ("int8 dyn. act. x int8 (torchao)", torchao_quantize(lm, "int8_dynamic"), ()),
            ("int4 g32 weight-only (torchao)", torchao_quantize(lm, "intx_weight", bits=4, group_size=32), ()),
            ("int4 g32 fake-quant (ours)", lm, (mmlab.methods.get("rtn", bits=4, group_size=32, sym=True),))]
    print(f"smollm2-135m on CPU, {args.threads} threads, {args.prompt}-token prompt, {args.new} new tokens, "
          f"median of {args.repeats}")
    print(f"{'scheme':<34} {'MiB':>7} {'bytes ratio':>11} {'prefill tok/s':>13} {'ratio':>6} "
          f"{'decode tok/s':>12} {'ratio':>6}")
    base = None
    for label, bundle, methods in rows:
        size = model_bytes(bundle.model)
        pre, dec = measure(bundle, prompt, args.new, args.repeats, methods)
        base = base or (size, pre, dec)
        print(f"{label:<34} {size / 2**20:>7.1f} {size / base[0]:>11.3f} {pre:>13.1f} {pre / base[1]:>6.2f} "
              f"{dec:>12.1f} {dec / base[2]:>6.2f}")


if __name__ == "__main__":
    main()
