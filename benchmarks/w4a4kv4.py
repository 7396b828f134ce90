"""W4A4KV4 on smollm2-135m as composed runs (COMET's setting), with and without FMPQ.

Each row is one method list: GPTQ-4 weights (group 64), activations per token (``act``) or
COMET's block-wise mixed precision (``fmpq``: outlier channel blocks at 8 bits, the rest at 4),
and KIVI-4 keys / values. Perplexity of the continuation: ``--windows`` windows of
``--window`` tokens, the first ``--context`` prefilled (and KV-quantized), the rest scored.
Two texts: the docstring corpus's head (the same domain as the calibration windows, drawn from
its tail) and Debian's license prose (never calibrated on). "A8 share" is the share of the
linears' input activations that FMPQ keeps at 8 bits (calibrated, per token).

    python benchmarks/w4a4kv4.py [--window 1024] [--context 768] [--windows 4]
"""

import argparse

import mmlab
from mmlab.evaluate import perplexity_many
from mmlab.methods import parse
from mmlab.quantize import activation_states

W4 = "gptq(bits=4, group_size=64)"
KV4 = "kivi(bits=4)"
ROWS = {
    "FP32": "none",
    "W4": W4,
    "W4 KV4": f"{W4}+{KV4}",
    "W4A8": f"{W4}+act(act_bits=8)",
    "W4A8 KV4": f"{W4}+act(act_bits=8)+{KV4}",
    "W4A4": f"{W4}+act(act_bits=4)",
    "W4A4 KV4": f"{W4}+act(act_bits=4)+{KV4}",
    "A4 alone": "act(act_bits=4)",
    "W4Ax (FMPQ)": f"{W4}+fmpq",
    "**W4AxKV4 (FMPQ)**": f"{W4}+fmpq+{KV4}",
    "Ax alone (FMPQ)": "fmpq",
    "W4A4 KV4, FMPQ blocks without 8-bit (high_fraction=0)": f"{W4}+fmpq(high_fraction=0.0)+{KV4}",
}


def a8_share(bundle, spec: str) -> str:
    fm = [m for m in parse(spec) if m.name == "fmpq"]
    if not fm:
        return ""
    states = activation_states(bundle, fm[0])
    high = sum(n for _, _, n in states.values())
    total = sum(len(p) for p, _, _ in states.values())
    return f"{high / total:.1%}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--context", type=int, default=768)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    smol = mmlab.load("smollm2-135m")
    texts = {"docstrings": mmlab.data.offline_corpus(), "prose": mmlab.data.prose_corpus()}
    lists = [parse(s) for s in ROWS.values()]
    res = {name: perplexity_many(smol, text, lists, window=args.window, context=args.context,
                                 max_windows=args.windows, progress=False) for name, text in texts.items()}
    print(f"smollm2-135m, {args.windows} windows x {args.window} tokens per text ({args.context} prefilled, "
          f"{args.window - args.context} scored)\n")
    print("| run | method list | docstrings | prose | KV MiB | A8 share |")
    print("|---|---|---|---|---|---|")
    for i, (row, spec) in enumerate(ROWS.items()):
        d, p = res["docstrings"][i], res["prose"][i]
        print(f"| {row} | `{spec}` | {d.perplexity:.2f} | {p.perplexity:.2f} | {d.kv_bytes / 2**20:.2f} | "
              f"{a8_share(smol, spec)} |")


if __name__ == "__main__":
    main()
