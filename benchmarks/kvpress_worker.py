"""Runs inside the kvpress venv (created by kvpress_compare.py): NVIDIA kvpress presses on the same
SmolLM2-135M weights. A small request / reply loop on stdin / stdout, one JSON line each way, so the
comparer can interleave our measurements and kvpress's one configuration at a time:

    {"method": "snapkv", "budget": 0.5, "ids": [...], "context": 768}
 -> {"prefill_ms": ..., "nll": ..., "count": ..., "kv_len_layer0": ...}

Imports nothing from mmlab (that venv has kvpress's pinned transformers, not ours)."""

import json
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


@torch.inference_mode()
def measure(models, req):
    w, context = torch.tensor(req["ids"]), req["context"]
    model = models["eager" if req["method"] == "h2o" else "sdpa"]
    ctx, cont = w[None, :context], w[None, context:]
    cache = DynamicCache()
    t = time.perf_counter()
    if req["method"] == "none":
        out = model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
    else:
        with PRESSES[req["method"]](1.0 - req["budget"])(model):
            out = model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
    ms = (time.perf_counter() - t) * 1e3
    pos = torch.arange(context, w.numel())[None]  # positions continue past the full context
    logits = model(input_ids=cont, past_key_values=cache, position_ids=pos).logits[0]
    logits = torch.cat([out.logits[0, -1:], logits[:-1]]).float()
    nll = torch.nn.functional.cross_entropy(logits, w[context:], reduction="sum").item()
    return {"prefill_ms": ms, "nll": nll, "count": cont.numel(), "kv_len_layer0": cache.layers[0].keys.shape[-2]}


def main():
    model_dir, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    models = {impl: AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl).eval()
              for impl in ("sdpa", "eager")}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(measure(models, json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
