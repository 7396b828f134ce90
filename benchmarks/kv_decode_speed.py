"""Decode speed and cache bytes vs KV budget, measured alone (not inside a parallel sweep).

smollm2-135m, one long context (offline corpus), H2O at each budget (the rule does not
change the decode cost, only the cache length does): bytes of the cache tensors held after
compression and the median ms per generated token, as ratios to the full cache.

    python benchmarks/kv_decode_speed.py [--context 2048] [--new 32]
"""

import argparse

import torch

import mmlab
from mmlab.data.text import offline_corpus


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--method", default="h2o")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = mmlab.load("smollm2-135m")
    ids = lm.tokenizer(offline_corpus(), add_special_tokens=False).input_ids[: args.context]
    prompt = {"prompt": lm.tokenizer.decode(ids)}
    mmlab.run(lm, prompt, max_new_tokens=4)  # warm-up
    print(f"smollm2-135m, {args.context}-token context, {args.new} new tokens, {args.method}, {args.threads} threads")
    print(f"{'budget':>7} {'KV MiB':>8} {'bytes ratio':>11} {'decode ms/token':>16} {'decode ratio':>12}")
    base = None
    for budget in (1.0, 0.5, 0.35, 0.2, 0.1):
        methods = [] if budget == 1.0 else [mmlab.methods.get(args.method, budget=budget)]
        tr = mmlab.run(lm, prompt, methods, max_new_tokens=args.new)
        row = (tr.kv_bytes, tr.timings["decode_ms_per_token"])
        base = base or row
        print(f"{budget:>7.2f} {row[0] / 2**20:>8.1f} {row[0] / base[0]:>11.3f} {row[1]:>16.1f} "
              f"{row[1] / base[1]:>12.3f}")


if __name__ == "__main__":
    main()
