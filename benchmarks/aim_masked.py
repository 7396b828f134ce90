"""AIM's in-LLM pruning as its official code does it (masked keys) against mmlab's (removal).

The official code (LaVi-Lab/AIM) keeps a pruned visual token in the sequence: it is masked as a
key for every later query, but it stays a query row, so its hidden state is still updated and
its attention row still feeds the next layer's PageRank importance. mmlab removes the token.
This script runs a masked-query reference of the same rule on tiny-llava: the engine's own
prompt (AIM's merge before the LLM included), then the decoder layers driven here with a key
mask that grows layer by layer, ranking the remaining visual tokens by ``pagerank_importance``
over the full (masked) attention map of the previous layer. Answers are one word (one token of
tiny-llava's vocabulary), so the answer is the argmax of the last position's logits. Check first:
with in-LLM pruning off (merge only) the reference and the engine give the same answers.

Prints the accuracy of both on the same held-out samples and the overlap of the visual tokens
alive at each layer.

    python benchmarks/aim_masked.py [--n-samples 400] [--keep-ratio 0.4375] [--prune-from 0.40625 --prune-to 0.65625]

On a 4-layer LLM the paper's schedule prunes once (layer 2 keeps 0.625, layer 3 none), so the two
rules agree by construction; ``--prune-from 0 --prune-to 1`` prunes at layers 1, 2 and 3 (0.75,
0.5, 0.25), where masked tokens' attention rows feed the later rankings.
"""

import argparse

import torch

import mmlab
from mmlab import engine
from mmlab.evaluate import is_correct
from mmlab.methods.token_pruning import AIM, pagerank_importance


@torch.inference_mode()
def masked_reference(bundle, sample, aim: AIM):
    """(predicted word, {layer: alive visual positions}) with pruned tokens masked as keys only."""
    adapter = bundle.adapter
    inputs = bundle.encode(sample)
    ctx = engine._context(bundle, inputs, [aim], (), 0)
    tokens = engine._prompt(bundle, inputs, [aim], ctx, {})
    hidden, positions, is_image = tokens.hidden, tokens.positions, tokens.is_image
    n, n_layers = hidden.shape[1], len(adapter.layers)
    masked = torch.zeros(n, dtype=torch.bool)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    alive, prev = {}, None
    for i in range(n_layers):
        if i > 0:
            n_keep = int(ctx.n_image_tokens * aim.retention(i, n_layers))
            live = torch.nonzero(is_image & ~masked).flatten()
            if live.numel() > n_keep:
                h_in, pe_in, keys, mask_in = prev
                logits = adapter.attention_logits(i - 1, h_in, pe_in, keys, torch.arange(n))
                logits = logits.masked_fill(mask_in[None, None, :], float("-inf"))  # as layer i-1 saw them
                top = live[pagerank_importance(logits, aim.tau, aim.iters)[live].topk(n_keep).indices]
                masked[live] = True
                masked[top] = False
        alive[i] = tokens.source[is_image & ~masked].tolist()  # as prompt indices, like Trace.layer_tokens
        allowed = causal & ~masked[None, :]
        pe = adapter.rotary(hidden, positions, i)
        cache = engine.KVCache(n_layers)
        out = engine._call_layer(adapter.layers[i], hidden, positions, pe, cache, allowed[None, None])
        prev = (hidden, pe, cache.keys[i], masked.clone())
        hidden = out
    logits = adapter.logits(hidden[:, -1:])[-1]
    return bundle.tokenizer.decode([int(logits.argmax())]).strip(), alive


def removal_alive(bundle, sample, aim: AIM) -> tuple[str, dict]:
    tr = mmlab.run(bundle, sample, [aim], max_new_tokens=1)
    src = tr.layer_tokens
    img = tr.modality >= 0
    return tr.answer.strip(), {i: [int(s) for s in src[i] if img[s]] for i in range(len(src))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-samples", type=int, default=400)
    ap.add_argument("--keep-ratio", type=float, default=0.4375)
    ap.add_argument("--prune-from", type=float, default=13 / 32)
    ap.add_argument("--prune-to", type=float, default=21 / 32)
    args = ap.parse_args()
    bundle = mmlab.load("tiny-llava")
    aim = AIM(keep_ratio=args.keep_ratio, prune_from=args.prune_from, prune_to=args.prune_to)
    samples = mmlab.data.shapes(args.n_samples, split="test")
    merge_only = AIM(keep_ratio=args.keep_ratio, prune_from=1.0, prune_to=2.0)
    same = sum(removal_alive(bundle, s, merge_only)[0] == masked_reference(bundle, s, merge_only)[0]
               for s in samples[:20])
    assert same == 20, f"the reference disagrees with the engine without pruning on {20 - same} of 20 samples"
    ok = {"removal (mmlab)": 0, "masked keys (official)": 0}
    overlap: dict[int, list[float]] = {}
    for s in samples:
        pred_r, alive_r = removal_alive(bundle, s, aim)
        pred_m, alive_m = masked_reference(bundle, s, aim)
        ok["removal (mmlab)"] += is_correct(pred_r, s)
        ok["masked keys (official)"] += is_correct(pred_m, s)
        for i in alive_m:
            a, b = set(alive_r.get(i, [])), set(alive_m[i])
            if b or a:
                overlap.setdefault(i, []).append(len(a & b) / max(len(a | b), 1))
    print(f"tiny-llava, {len(samples)} test samples, {aim}")
    for k, v in ok.items():
        print(f"  {k:24s} accuracy {v / len(samples):.1%}")
    for i, v in sorted(overlap.items()):
        print(f"  layer {i}: alive visual tokens, Jaccard overlap removal vs masked {sum(v) / len(v):.3f}")


if __name__ == "__main__":
    main()
