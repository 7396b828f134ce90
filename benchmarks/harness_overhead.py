"""What the harness plugins add per answer over ``mmlab.run``: the lmms-eval model on tiny-llava (shapes
questions, 3 new tokens) and the lm-eval model on smollm2-135m (text prompts, 16 new tokens).

Each round answers the same N samples twice, interleaved: directly (``mmlab.engine.run`` per sample)
and through the plugin (one ``generate_until`` call over N requests, as the harness makes it, including
the cost sidecar write). Prints medians over rounds and the ratio plugin / direct (target <= 1.03).

    python benchmarks/harness_overhead.py [--n 40] [--rounds 7] [--threads 1]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mmlab
from mmlab import engine


def lmms_case(n: int, costs: Path):
    from lmms_eval.api.instance import Instance

    from mmlab.bench.lmms_model import MMLab

    b = mmlab.load("tiny-llava")
    samples = mmlab.data.shapes(n, seed=0)
    lm = MMLab(pretrained=b, costs=str(costs / "lmms.json"))
    lm.task_dict = {"t": {"test": [{"image": s.image} for s in samples]}}
    reqs = [Instance("generate_until", (s.question, {"max_new_tokens": 3}, lambda d: [d["image"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, s in enumerate(samples)]
    direct = [{"images": [s.image], "question": s.question, "query_after": False} for s in samples]
    return (lambda: [engine.run(b, d, [], max_new_tokens=3) for d in direct]), (lambda: lm.generate_until(reqs))


def lm_case(n: int, costs: Path):
    from lm_eval.api.instance import Instance

    from mmlab.bench.lm_model import MMLabLM

    b = mmlab.load("smollm2-135m")
    from mmlab.data.text import offline_corpus

    text = offline_corpus()
    prompts = [text[i * 400:(i * 400) + 400] for i in range(n)]
    lm = MMLabLM(pretrained=b, costs=str(costs / "lm.json"))
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n\n\n"], "max_gen_toks": 16}), idx=0,
                     metadata=("t", i, 1)) for i, p in enumerate(prompts)]
    return (lambda: [engine.run(b, {"prompt": p}, [], max_new_tokens=16) for p in prompts]), \
        (lambda: lm.generate_until(reqs, disable_tqdm=True))


def measure(name: str, direct, plugin, rounds: int) -> None:
    d, p = [], []
    for r in range(rounds + 1):  # round 0 warms up
        t = time.perf_counter()
        direct()
        td = time.perf_counter() - t
        t = time.perf_counter()
        plugin()
        tp = time.perf_counter() - t
        if r:
            d.append(td)
            p.append(tp)
    ratios = [b / a for a, b in zip(d, p)]
    print(f"{name:38s} direct {statistics.median(d):7.3f} s  plugin {statistics.median(p):7.3f} s  "
          f"plugin/direct {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        measure(f"lmms-eval / tiny-llava ({args.n} answers)", *lmms_case(args.n, Path(tmp)), args.rounds)
        measure(f"lm-eval / smollm2-135m ({args.n} answers)", *lm_case(args.n, Path(tmp)), args.rounds)


if __name__ == "__main__":
    main()
