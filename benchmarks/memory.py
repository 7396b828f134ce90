"""Peak memory (RSS): KV methods on a long smollm2-135m prompt, each in a fresh process, and the worst
run of every sweep under runs/ (each notebook kernel records its peak RSS with its metrics).

H2O scores every key by the attention all queries give it: mmlab sums those scores over chunks of
queries (``mmlab.engine.SCORE_CHUNK_BYTES``), so no heads x n x n map is held. Target: H2O on a
4096-token prompt under 1.5 GiB peak RSS.

    python benchmarks/memory.py [--tokens 4096] [--runs runs]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

SETTINGS = ["none", "streamingllm", "snapkv", "h2o"]


def child(method: str, tokens: int) -> None:
    import torch

    import mmlab
    from mmlab.recording import peak_rss_mb

    torch.set_num_threads(2)
    lm = mmlab.load("smollm2-135m")
    ids = lm.tokenizer(mmlab.data.offline_corpus(), return_tensors="pt", add_special_tokens=False).input_ids
    loaded = peak_rss_mb()
    methods = [] if method == "none" else [mmlab.methods.get(method, budget=0.5)]
    tr = mmlab.run(lm, mmlab.Inputs(ids[:, :tokens]), methods, max_new_tokens=4)
    print(json.dumps({"method": method, "peak_mb": peak_rss_mb(), "loaded_mb": loaded,
                      "kv_mb": tr.kv_bytes / 2**20, "prefill_ms": tr.timings["prefill_ms"]}))


def sweeps(runs: Path) -> None:
    print(f"\nworst run of each sweep under {runs}/ (peak RSS recorded by its kernel)")
    print(f"{'sweep':<18} {'runs':>5} {'worst run':<32} {'peak MiB':>9}")
    for d in sorted(p for p in runs.iterdir() if p.is_dir()):
        peaks = []
        for f in d.glob("*.json"):
            try:
                r = json.loads(f.read_text())
            except ValueError:
                continue
            if isinstance(r, dict) and "peak_rss_mb" in r.get("metrics", {}):  # (reproduce/ holds lists)
                peaks.append((r["metrics"]["peak_rss_mb"], r["run_id"]))
        if peaks:
            mb, rid = max(peaks)
            print(f"{d.name:<18} {len(peaks):>5} {rid[:32]:<32} {mb:>9.0f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.tokens)
    print(f"smollm2-135m, {args.tokens}-token prompt, budget 0.5, 4 new tokens, a fresh process each")
    print(f"{'method':<14} {'peak MiB':>9} {'model loaded':>13} {'KV MiB':>7} {'prefill ms':>11}")
    for m in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--child", m, "--tokens", str(args.tokens)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{m:<14} {r['peak_mb']:>9.0f} {r['loaded_mb']:>13.0f} {r['kv_mb']:>7.1f} {r['prefill_ms']:>11.0f}")
    if Path(args.runs).is_dir():
        sweeps(Path(args.runs))


if __name__ == "__main__":
    main()
