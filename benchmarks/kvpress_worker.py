"""Runs inside the kvpress venv (created by kvpress_compare.py): NVIDIA kvpress presses on the same
SmolLM2-135M weights and token windows; writes continuation perplexity and prefill+compression
time per (press, budget) as JSON. Imports nothing from mmlab (that venv has kvpress's pinned
transformers, not ours)."""

import json
import math
import statistics
import sys
import time

import torch
from kvpress import ObservedAttentionPress, SnapKVPress, StreamingLLMPress
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

PRESSES = {
    "snapkv": lambda ratio: SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5),
    "streamingllm": lambda ratio: StreamingLLMPress(compression_ratio=ratio, n_sink=4),
    "h2o": lambda ratio: ObservedAttentionPress(compression_ratio=ratio),  # needs eager attention
}


def main():
    model_dir, ids_path, out_path, budgets, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(int(threads))
    windows, context = torch.load(ids_path)["windows"], torch.load(ids_path)["context"]
    budgets = [float(b) for b in budgets.split(",")]
    models = {impl: AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl).eval()
              for impl in ("sdpa", "eager")}
    for model in models.values():  # warm-up, so the first timed configuration is not penalised
        with torch.inference_mode():
            model(input_ids=windows[0][None, :context])
    results = []
    for name, make in [("none", None), *PRESSES.items()]:
        for budget in ([1.0] if name == "none" else budgets):
            model = models["eager" if name == "h2o" else "sdpa"]
            nll, count, times = 0.0, 0, []
            for w in windows:
                ctx, cont = w[None, :context], w[None, context:]
                cache = DynamicCache()
                with torch.inference_mode():
                    t = time.perf_counter()
                    if make is None:
                        out = model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
                    else:
                        with make(1.0 - budget)(model):
                            out = model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
                    times.append((time.perf_counter() - t) * 1e3)
                    pos = torch.arange(context, w.numel())[None]  # positions continue past the full context
                    logits = model(input_ids=cont, past_key_values=cache, position_ids=pos).logits[0]
                logits = torch.cat([out.logits[0, -1:], logits[:-1]]).float()
                nll += torch.nn.functional.cross_entropy(logits, w[context:], reduction="sum").item()
                count += cont.numel()
            results.append({"method": name, "budget": budget, "perplexity": math.exp(nll / count),
                            "prefill_ms": statistics.median(times), "kv_len_layer0": cache.layers[0].keys.shape[-2]})
            print(results[-1], flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
