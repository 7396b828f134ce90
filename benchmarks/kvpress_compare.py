"""mmlab's KV methods side by side with NVIDIA's kvpress, in one benchmark run, on smollm2-135m.

kvpress (PyPI) pins a transformers release older than ours, so this script creates its own
venv (``.venv-kvpress``: torch 2.13.0 + kvpress 0.5.5) on first use and runs
``kvpress_worker.py`` there on the same weights (the converted smollm2-135m cache) and the
same token windows of the offline corpus. For each method both have, at each budget:
continuation perplexity (context prefilled and compressed, the rest scored) and the median
prefill+compression wall-clock, ours / theirs (target: <= 1, not slower).

Pairs: snapkv <-> SnapKVPress(window 64, kernel 5); streamingllm <-> StreamingLLMPress(4 sinks);
h2o <-> ObservedAttentionPress (not the same rule: it averages each key's attention over the
queries that can see it and keeps no recent window; ours sums and keeps half the budget
recent; it needs eager attention, ours recomputes scores beside SDPA).

    python benchmarks/kvpress_compare.py [--budgets 0.5,0.35,0.2,0.1] [--windows 4]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mmlab
from mmlab.data.text import offline_corpus
from mmlab.models import Inputs, cache_dir

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-kvpress"
PINS = ["torch==2.13.0", "kvpress==0.5.5"]


def kvpress_python() -> Path:
    py = VENV / "bin" / "python"
    if not ((VENV / ".installed").exists() and py.exists()):  # missing or half-built: (re)create
        print(f"creating {VENV} ({', '.join(PINS)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", PINS[0]], check=True)  # CPU wheel first
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
        (VENV / ".installed").touch()
    return py


def ours(bundle, text, args, name, budget):
    methods = [] if name == "none" else [mmlab.methods.get(name, budget=budget)]
    r = mmlab.perplexity(bundle, text, methods, window=args.window, context=args.context, max_windows=args.windows,
                         progress=False)  # the same windows: the text's first tokens, no special tokens
    return r.perplexity, r.prefill_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.5,0.35,0.2,0.1")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--context", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = mmlab.load("smollm2-135m")  # also makes sure the converted weights exist for the worker
    text = offline_corpus()
    ids = bundle.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    py = kvpress_python()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"windows": windows, "context": args.context}, f"{tmp}/ids.pt")
        t = time.time()
        subprocess.run([str(py), str(Path(__file__).with_name("kvpress_worker.py")), str(cache_dir() / "smollm2-135m"),
                        f"{tmp}/ids.pt", f"{tmp}/out.json", args.budgets, str(args.threads)], check=True)
        theirs = {(r["method"], r["budget"]): r for r in json.loads(Path(f"{tmp}/out.json").read_text())}
        print(f"kvpress side: {time.time() - t:.0f} s")
    for _ in range(2):  # warm-up on our side too
        mmlab.prefill(bundle, Inputs(windows[0][None, :args.context]))
    print(f"\nsmollm2-135m, {args.windows} windows x {args.window} tokens, first {args.context} compressed, "
          f"{args.threads} threads; time = median prefill + compression per window")
    print(f"{'method':<13} {'budget':>6} {'ppl mmlab':>10} {'ppl kvpress':>11} {'rel diff':>9} "
          f"{'ms mmlab':>9} {'ms kvpress':>10} {'time ratio':>10}")
    for (name, budget), r in theirs.items():
        ppl, ms = ours(bundle, text, args, name, budget)
        print(f"{name:<13} {budget:>6.2f} {ppl:>10.3f} {r['perplexity']:>11.3f} {ppl / r['perplexity'] - 1:>+9.2%} "
              f"{ms:>9.1f} {r['prefill_ms']:>10.1f} {ms / r['prefill_ms']:>10.2f}")


if __name__ == "__main__":
    main()
