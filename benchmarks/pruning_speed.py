"""Real prefill speedup of visual-token pruning, beside the analytic FLOPs ratio.

Model: LLaVA architecture with SmolLM2-135M's language-model dimensions (30 layers, width
576, 9 query / 3 KV heads, SwiGLU 1536) behind a CLIP tower at 336 px / 14 px, i.e. 576
visual tokens, random weights (speed does not depend on them). The vision tower is kept
small (it is identical for every method and outside the FLOPs count); its time is
reported in the end-to-end column only.

For each method: the median over interleaved repeats of the language-model prefill time
(prefill minus vision tower minus method stages), the speedup vs no pruning, the analytic
FLOPs ratio from the Trace's real per-layer token counts, and speedup / FLOPs ratio
(target >= 0.85). The methods' own selection time is printed separately.

    python benchmarks/pruning_speed.py [--keep 0.25] [--repeats 15] [--device cuda]
"""

import argparse
import statistics

import torch

import mmlab
from mmlab.testing import random_bundle

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0)
CLIP_336 = dict(image_size=336, patch_size=14, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = random_bundle("llava", text=SMOLLM2_135M, vision=CLIP_336)
    bundle.model.to(args.device)
    sample = mmlab.data.shapes(1, seed=0)[0]
    inputs = bundle.encode(sample)
    inputs.input_ids, inputs.pixel_values = inputs.input_ids.to(args.device), inputs.pixel_values.to(args.device)
    cases = {
        "none": [],
        f"divprune keep {args.keep:.0%}": [mmlab.methods.get("divprune", keep_ratio=args.keep)],
        f"fastv K=2 keep {args.keep:.0%}": [mmlab.methods.get("fastv", layer=2, keep_ratio=args.keep)],
        f"random keep {args.keep:.0%}": [mmlab.methods.get("random", keep_ratio=args.keep)],
        f"pool keep {args.keep:.0%}": [mmlab.methods.get("pool", keep_ratio=args.keep)],
    }

    def once(methods):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        p = mmlab.prefill(bundle, inputs, methods)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = p.trace.timings
        method_ms = t.get("method_ms", 0.0)
        return p.trace, t["prefill_ms"], t["prefill_ms"] - t["vision_ms"] - method_ms, method_ms

    for methods in cases.values():  # warm-up
        for _ in range(3):
            once(methods)
    times = {k: {"e2e": [], "llm": [], "method": []} for k in cases}
    traces = {}
    for _ in range(args.repeats):  # interleaved: load drifts hit every method alike
        for name, methods in cases.items():
            tr, e2e, llm, meth = once(methods)
            traces[name] = tr
            times[name]["e2e"].append(e2e), times[name]["llm"].append(llm), times[name]["method"].append(meth)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    base, base_flops = med["none"], traces["none"].prefill_flops
    print(f"LLaVA arch, SmolLM2-135M LLM dims, {traces['none'].n_image_tokens_in} visual tokens, "
          f"{traces['none'].prompt_length}-token prompt, {args.device}, {args.threads} threads, "
          f"median of {args.repeats} interleaved repeats")
    hdr = (f"{'method':<22} {'tokens L0/Llast':>15} {'FLOPs ratio':>11} {'LLM ms':>8} {'LLM speedup':>11} "
           f"{'speedup/FLOPs':>13} {'e2e ms':>8} {'e2e speedup':>11} {'method ms':>9}")
    print(hdr)
    for name, m in med.items():
        tr = traces[name]
        fr = base_flops / tr.prefill_flops
        sp = base["llm"] / m["llm"]
        print(f"{name:<22} {f'{tr.tokens_per_layer[0]}/{tr.tokens_per_layer[-1]}':>15} {fr:>11.2f} {m['llm']:>8.1f} "
              f"{sp:>11.2f} {sp / fr:>13.2f} {m['e2e']:>8.1f} {base['e2e'] / m['e2e']:>11.2f} {m['method']:>9.2f}")


if __name__ == "__main__":
    main()
