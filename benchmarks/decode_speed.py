"""Decode speed: per-token time of mmlab's decode loop against transformers' ``generate``, and the
per-step cost of KV methods and KIVI, on smollm2-135m.

Per-token time = the median over generated tokens of the time each decode step takes (ours: the
Trace's steps; generate: timestamps from a stopping-criteria callback after every token), medians
of interleaved repeats. Target: mmlab / generate <= 1.0 at 512 and 2048 prompt tokens.

    python benchmarks/decode_speed.py [--contexts 512,2048] [--new 48] [--repeats 5]
"""

import argparse
import statistics
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import mmlab
from mmlab.data.text import offline_corpus


class Stamps(StoppingCriteria):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def generate_ms(lm, ids, new: int) -> float:
    stamps = Stamps()
    with torch.inference_mode():
        lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, stopping_criteria=StoppingCriteriaList([stamps]),
                          pad_token_id=lm.tokenizer.eos_token_id)
    return statistics.median((b - a) * 1e3 for a, b in zip(stamps.times, stamps.times[1:]))


def ours_ms(lm, ids, new: int, methods=()) -> tuple[float, int, int]:
    tr = mmlab.run(lm, mmlab.Inputs(ids), list(methods), max_new_tokens=new)
    if len(tr.answer_ids) < new:
        raise SystemExit(f"the model stopped after {len(tr.answer_ids)} tokens; pick another prompt")
    return tr.timings["decode_ms_per_token"], tr.kv_bytes, tr.kv_bytes_final


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = mmlab.load("smollm2-135m")
    corpus = lm.tokenizer(offline_corpus(), return_tensors="pt", add_special_tokens=False).input_ids
    get = mmlab.methods.get
    settings = [("none", []), ("streamingllm 0.5", [get("streamingllm", budget=0.5)]),
                ("h2o 0.5", [get("h2o", budget=0.5)]), ("snapkv 0.5", [get("snapkv", budget=0.5)]),
                ("h2o 0.1", [get("h2o", budget=0.1)]), ("kivi 4-bit", [get("kivi", bits=4)]),
                ("kivi 2-bit", [get("kivi", bits=2)])]
    print(f"smollm2-135m, {args.new} new tokens, {args.threads} threads, medians of {args.repeats} interleaved repeats")
    for n in (int(c) for c in args.contexts.split(",")):
        ids = corpus[:, 4000:4000 + n]  # raw prose: the model continues it without stopping
        generate_ms(lm, ids, 4), ours_ms(lm, ids, 4)  # warm-up
        hf, mine = [], {label: [] for label, _ in settings}
        for _ in range(args.repeats):
            hf.append(generate_ms(lm, ids, args.new))
            for label, ms in settings:
                mine[label].append(ours_ms(lm, ids, args.new, ms))
        base = statistics.median(hf)
        none = statistics.median(r[0] for r in mine["none"])
        print(f"\n{n}-token prompt: transformers generate {base:.1f} ms/token")
        print(f"{'mmlab setting':<18} {'ms/token':>9} {'/ generate':>10} {'/ no method':>11} "
              f"{'KV MiB after prefill':>21} {'at the end':>10}")
        for label, rows in mine.items():
            ms = statistics.median(r[0] for r in rows)
            print(f"{label:<18} {ms:>9.1f} {ms / base:>10.3f} {ms / none:>11.3f} {rows[0][1] / 2**20:>21.1f} "
                  f"{rows[0][2] / 2**20:>10.1f}")


if __name__ == "__main__":
    main()
