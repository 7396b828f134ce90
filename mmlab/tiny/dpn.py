"""DPN's dynamic pooling experts trained into tiny-llava-deep (``mmlab train-tiny --dpn`` -> ``tiny-llava-dpn``).

The official recipe (aihao2000/DPN-LLaVA: ``llava_hr/hack/forward.py`` ``unbatch_pooling``, ``loss.py``,
``model.py`` ``PoolingRouter``, ``llava_hr/model/language_model/llava_llama.py`` (the total loss),
``scripts/v1_5/train_dpn_llava.sh``), read 2026-12-07:

* after each pooling layer (7, 15, 23 of 32; ``pooling_location="post"``) a router on one token's hidden
  state gives p = softmax(logits / 10) over the layer's experts (kernels 1, 2, 4; 1, 2 at the last);
* training *samples* the expert from p, drawing again while it would leave fewer than 18 visual tokens; the
  grid is max-pooled with its kernel (kernel 1: as it is) and the visual tokens multiplied by the chosen p
  (every expert, kernel 1 included: the router's path to the answer loss); a grid under 16 tokens is never
  pooled; shortened samples are padded with zeros at the end;
* loss = answer CE + 0.001 x hinge, hinge = max(0, 1.5 - mean(scale[argmax p] x max p)), scales 0 / 1 / 2 for
  experts 0 / 1 / 2 (its ``[[]] * n`` list puts every layer's terms in one list, so each layer's hinge is
  the mean over all layers: one hinge);
* everything is trained together (LLM, projector, tower, routers; one learning rate, 2e-5 on LLaVA-1.5-7B).

Deviations (named in ``papers/dpn.md``): the router token is the last prompt token (the code's path without
``use_special_token``; the official script adds a learned ``<ROUTER>`` token); pooled tokens keep their
window's top-left position (the engine's convention; the official renumbers 0..n-1); a separate router
learning rate; a few hundred steps on the shapes data from tiny-llava-deep instead of one epoch of LLaVA-665k.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmlab.methods.token_pruning import DPN_KERNELS, DPN_LAYERS, PoolingRouters, pooling_layers
from mmlab.tiny.train import warmup_cosine

HINGE_SCALES = (0.0, 1.0, 2.0)  # experts 0, 1, 2 (official ``scales``)
HINGE_MARGIN, HINGE_WEIGHT = 1.5, 1e-3
MIN_TOKENS = 16  # a grid with fewer visual tokens is never pooled
MIN_SAMPLED = 18  # training draws again while an expert would leave fewer visual tokens


def hinge_loss(states: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The official router loss over every (sample, pooling layer) routed: max(0, 1.5 - mean(scale[argmax p] x
    max p)); ``states`` holds (p (experts,), chosen expert) pairs."""
    terms = [HINGE_SCALES[int(p.argmax())] * p.max() for p, _ in states]
    return torch.clamp(HINGE_MARGIN - torch.stack(terms).mean(), min=0.0)


def choose_expert(p: torch.Tensor, kernels: tuple, rows: int, cols: int, sample: bool, gen=None) -> int:
    """Inference: the argmax. Training: drawn from p among the experts that leave >= 18 visual tokens (the
    official redraw loop; kernel 1 where none does, which the official loop would never leave)."""
    if not sample:
        return int(p.argmax())
    ok = torch.tensor([(rows // k) * (cols // k) >= MIN_SAMPLED for k in kernels])
    if not ok.any():
        return 0
    return int(torch.multinomial(p.detach() * ok, 1, generator=gen))


def pool_sample(h, pos, lab, grid, start: int, router, kernels, sample: bool, gen=None):
    """One sequence after a pooling layer: h (n, d), pos / lab (n,), grid (rows, cols) of its image at
    ``start``; ``router`` None: a uniform expert, no scaling (the official ``pooling_type="random"``).
    Returns (h, pos, lab, grid, (p, expert)) at the same length n (zeros / -100 pad the end)."""
    rows, cols = grid
    n, d = h.shape
    n_img = rows * cols
    r = int(torch.nonzero(lab >= 0)[0]) - 1  # the router token: the last one before the answer
    if router is None:  # the official random mode draws uniformly, with no redraw
        p, e = None, int(torch.randint(len(kernels), (1,), generator=gen))
    else:
        p = router(h[r])
        e = choose_expert(p, kernels, rows, cols, sample, gen)
    k = kernels[e]
    vis, vpos = h[start:start + n_img], pos[start:start + n_img]
    if k > 1 and min(rows, cols) >= k:
        vis = F.max_pool2d(vis.T.reshape(1, d, rows, cols), k, k).flatten(2)[0].T  # (rows//k * cols//k, d)
        vpos = vpos.view(rows, cols)[:rows // k * k:k, :cols // k * k:k].flatten()  # each window's top-left
        rows, cols = rows // k, cols // k
    end = start + n_img
    pad = n_img - vis.shape[0]
    h = torch.cat([h[:start], vis * p[e].to(h.dtype) if router is not None else vis, h[end:], h.new_zeros(pad, d)])
    pos = torch.cat([pos[:start], vpos, pos[end:], pos[-1] + 1 + torch.arange(pad)])
    lab = torch.cat([lab[:start + vis.shape[0]], lab[end:], lab.new_full((pad,), -100)])
    return h, pos, lab, (rows, cols), (p, e)


def dpn_forward(model, embeds: torch.Tensor, labels: torch.Tensor, routers: PoolingRouters, img_start: int,
                grid: tuple[int, int], sample: bool, gen=None, random: bool = False):
    """The LLM of a tiny LLaVA over ``embeds`` (B, n, d) with DPN pooling after each router's layer (every
    sequence's image at ``img_start``, a ``grid``; ``random``: uniform experts, unscaled, the routers unused).
    Returns (final hidden (B, n, d), realigned labels (B, n), router states [(p, expert)])."""
    lm = model.model.language_model
    b, n, _ = embeds.shape
    stages = pooling_layers(routers.layers, len(lm.layers))
    h, pos, lab, grids, states = embeds, torch.arange(n).expand(b, -1), labels, [grid] * b, []
    for i, layer in enumerate(lm.layers):
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
        h = out[0] if isinstance(out, tuple) else out
        if i not in stages:
            continue
        s = stages.index(i)
        rows = []
        for j in range(b):
            if grids[j][0] * grids[j][1] < MIN_TOKENS:
                rows.append((h[j], pos[j], lab[j], grids[j], None))
                continue
            rows.append(pool_sample(h[j], pos[j], lab[j], grids[j], img_start, None if random else routers.routers[s],
                                    routers.kernels[s], sample, gen))
        h, pos, lab = (torch.stack([r[k] for r in rows]) for k in range(3))
        grids = [r[3] for r in rows]
        states += [r[4] for r in rows if r[4] is not None]
    return lm.norm(h), lab, states


@torch.no_grad()
def routed_accuracy(model, tokenizer, routers: PoolingRouters, n: int = 256, seed: int = 0,
                    random: bool = False) -> dict:
    """Teacher-forced answer-word accuracy on the ``val`` split with the routers' argmax pooling (``random``:
    uniform experts) (a training monitor), and how often each expert was chosen."""
    from mmlab.arch.tiny_llava import pixel_values
    from mmlab.data.shapes import make_sample
    from mmlab.tiny.train import encode_qa, image_embeds, image_features

    samples = [make_sample(i, seed, "val") for i in range(n)]
    ids, labels = encode_qa(tokenizer, [(s.question, s.answer) for s in samples], model.config.image_seq_length,
                            getattr(model.config, "mmlab_system_prompt", None))
    embeds = image_embeds(model, ids, image_features(model, pixel_values([s.image for s in samples])))
    start = int(torch.nonzero(ids[0] == model.config.image_token_id)[0])
    side = math.isqrt(model.config.image_seq_length)
    gen = torch.Generator().manual_seed(seed)
    hidden, lab, states = dpn_forward(model, embeds, labels, routers, start, (side, side), False, gen, random)
    at = (lab >= 0).float().argmax(1)  # the answer word, realigned
    pred = model.lm_head(hidden[torch.arange(n), at - 1]).argmax(-1)
    ok = pred == lab[torch.arange(n), at]
    chosen: dict[str, int] = {}
    for _, e in states:
        chosen[str(e)] = chosen.get(str(e), 0) + 1
    return {"accuracy": round(ok.float().mean().item(), 4), "experts_chosen": chosen}


def train_dpn(steps: int = 600, batch_size: int = 32, lr: float = 2e-4, router_lr: float = 1e-3, seed: int = 0,
              routing: str = "router", out: Path | str | None = None) -> Path:
    """Fine-tune tiny-llava-deep with DPN's pooling routers (official schedule and experts); writes
    ``tiny-llava-dpn`` (weights + ``dpn.pt`` / ``dpn.json``) and returns that folder. ``routing="random"``: the
    official ``pooling_type="random"`` fine-tune instead (uniform experts, unscaled, no hinge, no routers
    saved), the control; default folder ``tiny-llava-dpn-random`` (not shipped)."""
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from mmlab.arch.tiny_llava import CHECKPOINT_DIR
    from mmlab.tiny.train import image_embeds, image_features, make_batch

    if routing not in ("router", "random"):
        raise ValueError(f"routing must be 'router' or 'random', got {routing!r}")
    random = routing == "random"
    src = CHECKPOINT_DIR / "tiny-llava-deep"
    model = LlavaForConditionalGeneration.from_pretrained(src).train()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(src)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    routers = PoolingRouters(model.config.text_config.hidden_size, DPN_LAYERS, DPN_KERNELS).train()
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr},
                             {"params": routers.parameters(), "lr": router_lr}], weight_decay=0.0)
    sched = warmup_cosine(opt, steps, max(1, int(0.03 * steps)))  # official: warm-up ratio 0.03, cosine
    n_img, system = model.config.image_seq_length, model.config.mmlab_system_prompt
    side = math.isqrt(n_img)
    t0, ema, log = time.time(), None, []
    bar = tqdm(range(steps), desc="train-tiny --dpn", mininterval=5)
    for step in bar:
        n = max(1, batch_size // 4)
        ids, labels, px, _, image_index = make_batch(tokenizer, range(step * n, (step + 1) * n), seed + 13, n_img,
                                                     system)
        start = int(torch.nonzero(ids[0] == model.config.image_token_id)[0])
        embeds = image_embeds(model, ids, image_features(model, px)[image_index])
        hidden, lab, states = dpn_forward(model, embeds, labels, routers, start, (side, side), True, gen, random)
        logits = model.lm_head(hidden)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1))
        hinge = torch.zeros(()) if random else hinge_loss(states)
        loss = ce + HINGE_WEIGHT * hinge
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = ce.item() if ema is None else 0.98 * ema + 0.02 * ce.item()
        if step % 50 == 0 or step == steps - 1:
            mean_p = [] if random else torch.stack([p.detach() for p, _ in states[:ids.shape[0]]]).mean(0).tolist()
            log.append({"step": step, "ce": round(ema, 4), "hinge": round(hinge.item(), 4),
                        "first_layer_p": [round(x, 3) for x in mean_p]})
            bar.set_postfix(ce=f"{ema:.3f}", hinge=f"{hinge.item():.3f}", p=log[-1]["first_layer_p"])
    model.eval()
    routers.eval()
    out = Path(out or CHECKPOINT_DIR / ("tiny-llava-dpn-random" if random else "tiny-llava-dpn"))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"dims": routers.dims, "from": "tiny-llava-deep", "routing": routing, "steps": steps,
            "batch_size": batch_size, "lr": lr, "router_lr": router_lr, "seed": seed, "hinge_weight": HINGE_WEIGHT,
            "min_sampled": MIN_SAMPLED, "seconds": round(time.time() - t0, 1), "final_ce": round(ema, 4), "log": log,
            "val": routed_accuracy(model, tokenizer, routers, random=random)}
    if not random:
        torch.save(routers.state_dict(), out / "dpn.pt")
    (out / ("dpn_random.json" if random else "dpn.json")).write_text(json.dumps(info, indent=1))
    print(f"trained {out.name} ({routing} experts): {steps} steps in {time.time() - t0:.0f} s, answer CE "
          f"{ema:.4f}, val {info['val']} -> {out}")
    return out
