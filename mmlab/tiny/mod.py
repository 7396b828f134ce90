"""Trained Mixture-of-Depths variants of tiny-llava (``mmlab train-tiny --mod pmod|gmod``).

Both fine-tune the shipped tiny-llava with vision-token routing in some LLM layers and ship
the result (weights + routers) as a checkpoint beside it:

* ``pmod`` (p-MoD): every layer routed by the PRD schedule (on 4 layers: 1, 0.75, 0.25,
  0.15 of the vision tokens; mean 0.5375), one zero-initialised Linear(hidden, 1) router per
  routed layer, TanhNorm weights w = 0.2 tanh(r) + 1 and STRing reweighting (routed:
  x + attn + w * mlp; skipped: w * x).
* ``gmod`` (gamma-MoD): the layers with the lowest ARank (measured on a calibration batch)
  become MoD layers at a constant ratio, with one router shared by all of them; text
  (question) tokens are always routed (masked routing). Deviation: gamma-MoD's shared
  Linear(hidden, 2) router trained with an auxiliary top-k loss is replaced by the same
  zero-initialised scalar router and TanhNorm/STRing weight path as p-MoD.

``mod_forward`` is the differentiable training forward; at inference the engine routes with
``mmlab.methods.get("mod_trained")`` and the bundle's ``extras["mod"]`` (routers + ratios).
Image tokens sit at the same positions in every tiny-llava prompt, so a batch routes the
same number of tokens per sample.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmlab.methods.mod import Routers, arank_layers, prd_ratio


def mod_forward(model, embeds: torch.Tensor, routers: Routers, img: slice) -> torch.Tensor:
    """Differentiable MoD forward of the LLM over ``embeds`` (B, n, d); vision tokens at ``img``.
    Returns the final hidden states (B, n, d)."""
    lm = model.model.language_model
    b, n, d = embeds.shape
    pos = torch.arange(n).expand(b, -1)
    h = embeds
    for i, layer in enumerate(lm.layers):
        ratio = routers.ratios[i]
        if ratio >= 1:
            h = layer(h, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
            h = h[0] if isinstance(h, tuple) else h
            continue
        n_img = img.stop - img.start
        score = routers.score(i, h[:, img])  # (B, n_img)
        w_img = routers.weight(score)
        top = score.topk(int(n_img * ratio), dim=1).indices.sort(dim=1).values + img.start
        keep = torch.cat([torch.arange(img.start).expand(b, -1), top, torch.arange(img.stop, n).expand(b, -1)], 1)
        w = torch.cat([torch.ones(b, img.start), w_img, torch.ones(b, n - img.stop)], 1)  # text: weight 1
        x, p, wk = h.gather(1, keep[..., None].expand(-1, -1, d)), pos.gather(1, keep), w.gather(1, keep)
        a = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=None, position_ids=p,
                            position_embeddings=lm.rotary_emb(x, p))[0]
        x = x + a
        x = x + wk[..., None] * layer.mlp(layer.post_attention_layernorm(x))  # STRing, routed side
        h = (h * w[..., None]).scatter(1, keep[..., None].expand(-1, -1, d), x)  # skipped side: w * x
    return lm.norm(h)


def calibration_arank(model, tokenizer, n: int = 8, seed: int = 0) -> list[float]:
    """ARank per layer of the dense tiny-llava on ``n`` validation prompts (gamma-MoD's layer choice)."""
    from mmlab.data.shapes import make_sample
    from mmlab.evaluate import arank
    from mmlab.models import Bundle

    bundle = Bundle.from_model(model, tokenizer, name="tiny-llava", adapter="tiny-llava", max_new_tokens=1)
    return arank(bundle, [make_sample(i, seed, "val") for i in range(n)])


def train_mod(kind: str = "pmod", steps: int = 1500, batch_size: int = 32, lr: float = 2e-4, router_lr: float = 1e-2,
              gmod_layers: int = 2, gmod_ratio: float = 0.25, seed: int = 0, out: Path | str | None = None) -> Path:
    """Fine-tune the shipped tiny-llava with MoD routing; writes ``tiny-llava-{kind}``."""
    from transformers import LlavaForConditionalGeneration

    from mmlab.arch.tiny_llava import CHECKPOINT_DIR
    from mmlab.tiny.model import build_tokenizer
    from mmlab.tiny.train import image_features, make_batch, quick_accuracy, warmup_cosine

    if kind not in ("pmod", "gmod"):
        raise ValueError(f"--mod must be pmod or gmod, got {kind!r}")
    tokenizer = build_tokenizer()
    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR / "tiny-llava").train()
    n_layers, hidden = len(model.model.language_model.layers), model.config.text_config.hidden_size
    info: dict = {"kind": kind, "steps": steps, "batch_size": batch_size}
    if kind == "pmod":
        ratios = [prd_ratio(i, n_layers) for i in range(n_layers)]
    else:
        ranks = calibration_arank(model.eval(), tokenizer)
        model.train()
        chosen = arank_layers(ranks, gmod_layers)
        ratios = [gmod_ratio if i in chosen else 1.0 for i in range(n_layers)]
        info.update(arank=ranks, mod_layers=chosen)
    routers = Routers(hidden, ratios, shared=kind == "gmod")
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr},
                             {"params": routers.parameters(), "lr": router_lr}], weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    n_img = model.config.image_seq_length
    img = slice(3, 3 + n_img)  # "<s> user :" then the image run, in every prompt
    t0, ema = time.time(), None
    bar = tqdm(range(steps), desc=f"train-tiny --mod {kind}", mininterval=5)
    for step in bar:
        n = max(1, batch_size // 4)
        ids, labels, px, _, image_index = make_batch(tokenizer, range(step * n, (step + 1) * n), seed + 7, n_img)
        assert bool((ids[:, img] == model.config.image_token_id).all())
        feats = image_features(model, px)[image_index]
        embeds = model.get_input_embeddings()(ids)
        embeds = torch.cat([embeds[:, :img.start], feats.to(embeds.dtype), embeds[:, img.stop:]], 1)
        logits = model.lm_head(mod_forward(model, embeds, routers, img))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    out = Path(out or CHECKPOINT_DIR / f"tiny-llava-{kind}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    torch.save(routers.state_dict(), out / "routers.pt")
    info.update(routers.config(), seconds=round(time.time() - t0, 1), final_loss=round(ema, 4),
                dense_val_accuracy_after=quick_accuracy(model, tokenizer))
    (out / "mod.json").write_text(json.dumps(info, indent=1))
    print(f"trained {kind} {steps} steps in {time.time() - t0:.0f} s, loss {ema:.4f} -> {out}")
    return out
