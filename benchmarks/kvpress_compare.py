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
import math
import statistics
import subprocess
import sys
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


class KVPress:
    """The kvpress worker process, one configuration per request (see kvpress_worker.py)."""

    def __init__(self, threads: int):
        self.proc = subprocess.Popen([str(kvpress_python()), str(Path(__file__).with_name("kvpress_worker.py")),
                                      str(cache_dir() / "smollm2-135m"), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def measure(self, name: str, budget: float, window: torch.Tensor, context: int) -> dict:
        self.proc.stdin.write(json.dumps({"method": name, "budget": budget, "ids": window.tolist(),
                                          "context": context}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


def ours(bundle, name: str, budget: float, window: torch.Tensor, context: int) -> dict:
    """Prefill + compression of the context (timed), then the continuation's NLL, as the worker does."""
    methods = [] if name == "none" else [mmlab.methods.get(name, budget=budget)]
    p = mmlab.prefill(bundle, Inputs(window[None, :context]), methods)
    cont = mmlab.engine.extend(bundle, p.cache, window[None, context:], p.next_position)
    logits = torch.cat([p.logits[-1:], cont[:-1]])
    nll = torch.nn.functional.cross_entropy(logits, window[context:], reduction="sum").item()
    return {"prefill_ms": p.trace.timings["prefill_ms"], "nll": nll, "count": window.numel() - context}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.5,0.35,0.2,0.1")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the windows, interleaved")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--context", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = mmlab.load("smollm2-135m")  # also makes sure the converted weights exist for the worker
    ids = bundle.tokenizer(offline_corpus(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    press = KVPress(args.threads)
    configs = [("none", 1.0)] + [(n, float(b)) for n in ("streamingllm", "snapkv", "h2o")
                                 for b in args.budgets.split(",")]
    for _ in range(2):  # warm-up on both sides
        press.measure("snapkv", 0.5, windows[0], args.context), ours(bundle, "snapkv", 0.5, windows[0], args.context)
    print(f"smollm2-135m, {args.windows} windows x {args.window} tokens, first {args.context} compressed, "
          f"{args.threads} threads; time = median over {args.repeats} x {args.windows} interleaved "
          f"prefill + compression measurements")
    print(f"{'method':<13} {'budget':>6} {'ppl mmlab':>10} {'ppl kvpress':>11} {'rel diff':>9} "
          f"{'ms mmlab':>9} {'ms kvpress':>10} {'time ratio':>10}")
    for name, budget in configs:
        mine, theirs = [], []
        for rep in range(args.repeats):
            for w in windows:  # alternate the two sides (and which goes first) so drifts hit both alike
                if rep % 2:
                    theirs.append(press.measure(name, budget, w, args.context))
                mine.append(ours(bundle, name, budget, w, args.context))
                if not rep % 2:
                    theirs.append(press.measure(name, budget, w, args.context))
        ppl = [math.exp(sum(r["nll"] for r in rs[: args.windows]) / sum(r["count"] for r in rs[: args.windows]))
               for rs in (mine, theirs)]
        ms = [statistics.median(r["prefill_ms"] for r in rs) for rs in (mine, theirs)]
        print(f"{name:<13} {budget:>6.2f} {ppl[0]:>10.3f} {ppl[1]:>11.3f} {ppl[0] / ppl[1] - 1:>+9.2%} "
              f"{ms[0]:>9.1f} {ms[1]:>10.1f} {ms[0] / ms[1]:>10.2f}")


if __name__ == "__main__":
    main()
