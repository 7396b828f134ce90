"""LLaVA-1.5-7B on a GPU: prefill ms, decode ms per token and peak GPU memory under each pruning method.

Medians of interleaved repeats (every method once per round; a first warm-up round is not counted).
Prefill: wall-clock of ``mmlab.prefill`` with CUDA synchronised around it. Decode: the Trace's median
ms per step (each step ends in an argmax read on the host, so it is synchronised). Peak memory:
``torch.cuda.max_memory_allocated`` over a method's calls, weights included. Visual tokens and LLM
prefill TFLOPs come from the Trace. Needs a CUDA GPU and the checkpoint (hub or local path); without
a GPU it says so and exits 0.

    python benchmarks/gpu_llava.py [--model llava-hf/llava-1.5-7b-hf] [--repeats 7] [--new-tokens 32]
    python benchmarks/gpu_llava.py --model tiny-llava --device cpu --repeats 2   # the code path, on CPU
"""

import argparse
import statistics
import time

import torch

import mmlab

METHODS = ["none", "divprune(keep_ratio=0.3333)", "divprune(keep_ratio=0.1111)", "fastv(layer=2, keep_ratio=0.5)",
           "fastv(layer=2, keep_ratio=0.25)", "random(keep_ratio=0.1111)", "pool(keep_ratio=0.25)", "aim",
           "pdrop", "mod(schedule='prd')"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skip: no CUDA GPU on this machine (run on one with `make bench-gpu`; --device cpu tries the code path)")
        return
    bundle = mmlab.load(args.model, dtype=args.dtype if args.device != "cpu" else None,
                        device=args.device if args.model not in ("tiny-llava",) else None)
    sample = mmlab.data.shapes(1, seed=0)[0]
    cases = {m: mmlab.methods.parse(m) for m in METHODS}
    stats = {m: {"prefill": [], "decode": [], "peak": 0, "trace": None} for m in cases}
    for r in range(args.repeats + 1):  # round 0 warms up (kernels, allocator) and is not counted
        for name, methods in cases.items():
            try:
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                p, ms = timed(lambda: mmlab.prefill(bundle, sample, methods), args.device)
                tr = mmlab.run(bundle, sample, methods, max_new_tokens=args.new_tokens)
            except mmlab.MethodError as e:
                stats[name]["error"] = str(e)
                continue
            if r == 0:
                continue
            s = stats[name]
            s["prefill"].append(ms)
            # per-step decode time from the Trace (each step ends in an argmax read on the host: synchronised)
            s["decode"].append(tr.timings.get("decode_ms_per_token", float("nan")))
            s["trace"] = tr
            if args.device.startswith("cuda"):
                s["peak"] = max(s["peak"], torch.cuda.max_memory_allocated())
    dense = statistics.median(stats["none"]["prefill"])
    print(f"{args.model} on {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
          f"{args.dtype}, medians of {args.repeats} interleaved repeats, {args.new_tokens} new tokens")
    print(f"{'method':34s} {'vis tok':>7s} {'TFLOPs':>7s} {'prefill ms':>10s} {'x dense':>7s} {'decode ms/tok':>13s} "
          f"{'peak GiB':>8s}")
    for name, s in stats.items():
        if not s["prefill"]:
            print(f"{name:34s} refused: {s.get('error')}")
            continue
        tr, pre = s["trace"], statistics.median(s["prefill"])
        print(f"{name:34s} {tr.image_tokens_per_layer()[0]:7d} {tr.prefill_flops / 1e12:7.3f} {pre:10.1f} "
              f"{dense / pre:7.2f} {statistics.median(s['decode']):13.2f} {s['peak'] / 2**30:8.2f}")


if __name__ == "__main__":
    main()
