"""Evaluation throughput: tiny-llava ``evaluate`` samples/s and smollm2-135m ``perplexity`` tokens/s, with
the fixed per-sample costs around the model (encoding, the vision tower, Trace and row building)
measured beside the LLM's own prefill and decode.

    python benchmarks/eval_throughput.py [--samples 200] [--windows 8] [--threads 2]
"""

import argparse
import statistics
import time

import torch

import mmlab
from mmlab.evaluate import _sample_row


def tiny_breakdown(tiny, samples) -> dict:
    """Median ms per sample of each part of one evaluate step."""
    parts = {k: [] for k in ("encode", "vision", "llm prefill", "decode", "trace + row", "total")}
    for i, s in enumerate(samples):
        t0 = time.perf_counter()
        inputs = tiny.encode(s)
        t1 = time.perf_counter()
        tr = mmlab.run(tiny, inputs, sample_index=i)
        t2 = time.perf_counter()
        _sample_row(i, s, tr)
        t3 = time.perf_counter()
        steps = len(tr.answer_ids) - 1
        decode = tr.timings.get("decode_ms_per_token", 0.0) * max(0, steps)
        parts["encode"].append((t1 - t0) * 1e3)
        parts["vision"].append(tr.timings["vision_ms"])
        parts["llm prefill"].append(tr.timings["prefill_ms"] - tr.timings["vision_ms"])
        parts["decode"].append(decode)
        parts["trace + row"].append((t2 - t1) * 1e3 - tr.timings["prefill_ms"] - decode + (t3 - t2) * 1e3)
        parts["total"].append((t3 - t0) * 1e3)
    return {k: statistics.median(v) for k, v in parts.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tiny, smol = mmlab.load("tiny-llava"), mmlab.load("smollm2-135m")
    samples = mmlab.data.shapes(n=args.samples, seed=0, split="test")
    mmlab.evaluate(tiny, samples[:8], progress=False)  # warm-up
    t = time.perf_counter()
    res = mmlab.evaluate(tiny, samples, progress=False)
    tiny_s = time.perf_counter() - t
    print(f"tiny-llava evaluate: {args.samples / tiny_s:.1f} samples/s ({args.samples} samples, accuracy "
          f"{res.accuracy:.4f}, {args.threads} threads)")
    parts = tiny_breakdown(tiny, samples[:64])
    print("  median ms per sample: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    corpus = mmlab.data.offline_corpus()
    mmlab.perplexity(smol, corpus, window=512, max_windows=1, progress=False)  # warm-up
    t = time.perf_counter()
    r = mmlab.perplexity(smol, corpus, window=512, max_windows=args.windows, progress=False)
    s = time.perf_counter() - t
    print(f"smollm2-135m perplexity: {r.n_tokens / s:.0f} tokens/s ({r.windows} x 512-token windows, "
          f"ppl {r.perplexity:.3f}; median prefill {r.prefill_ms:.0f} ms per window)")


if __name__ == "__main__":
    main()
