"""Dynamic-LLaVA's predictors: the vision predictor trained on an embedded VLM (``mmlab train-tiny --dynamic``),
the output-text predictor on the frozen SmolLM2 (``mmlab train-tiny --dynamic-text``, ``train_dynamic_text``:
the same recipe on windows whose last 128 tokens play the generated answer, keep rate 0.5).

The recipe of the official code (Osilly/dynamic_llava, ``dynamic_modeling_llama.py`` and
``run/train_dynamic_llava_7b.sh``): at the sparse layer the predictor's keep / drop logits are sampled
with a hard Gumbel-softmax (straight-through), the decision masks the dropped visual tokens as keys in
every later layer (``softmax_with_policy``: exp(scores) x policy, each token still sees itself), and the
loss is the answer's cross-entropy + 100 x (keep rate - mean decision)^2; Gumbel temperature 1 -> 0.1,
predictor learning rate 2e-4. Deviation: the LLM stays frozen (the official run also fine-tunes it at
5e-6 for one epoch of LLaVA-665k), so the shipped model is the base model plus the predictor, which is
saved beside its checkpoint (``dynamic_llava.pt`` + ``.json``) and loaded into ``bundle.extras``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmlab.methods.token_pruning import VisionPredictor
from mmlab.tiny.train import warmup_cosine

VISION_KEEP_RATE = 0.2  # official vision_keep_rate
MASK_LOSS_WEIGHT = 100.0
SPARSE_LAYER = 2 / 32  # official sparse_layer 2 of LLaVA-7B's 32


def softmax_with_policy(scores: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The official ``softmax_with_policy``: scores (B, H, n, n), policy (B, n) in {0, 1} (differentiable);
    a key's weight is multiplied by its policy, every token keeps itself."""
    n = policy.shape[1]
    eye = torch.eye(n, dtype=scores.dtype, device=scores.device)[None, None]
    pol = policy[:, None, None, :].to(scores.dtype)
    pol = pol + (1.0 - pol) * eye
    w = (scores - scores.amax(-1, keepdim=True)).float().exp() * pol.float()
    return ((w + eps / n) / (w.sum(-1, keepdim=True) + eps)).to(scores.dtype)


def policy_layer(block, h: torch.Tensor, pe, policy: torch.Tensor) -> torch.Tensor:
    """One Llama decoder layer written out with the policy softmax (causal, batch of equal lengths)."""
    attn = block.self_attn
    b, n, _ = h.shape
    x = block.input_layernorm(h)
    q, k, v = (proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj,
                                                                                  attn.v_proj))
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, *pe)
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
    scores = ((q @ k.transpose(-1, -2)) * attn.scaling).masked_fill(~causal, float("-inf"))
    o = (softmax_with_policy(scores, policy) @ v).transpose(1, 2).reshape(b, n, -1)
    h = h + attn.o_proj(o)
    return h + block.mlp(block.post_attention_layernorm(h))


def frozen_prefix(lm, embeds: torch.Tensor, layer: int):
    """The decoder ``lm`` (layers, rotary_emb, norm) on ``embeds`` (B, n, d) up to ``layer``, without gradients.
    Returns (hidden states entering ``layer``, rotary tables)."""
    b, n, _ = embeds.shape
    pos = torch.arange(n).expand(b, -1)
    pe = lm.rotary_emb(embeds, pos)
    h = embeds
    with torch.no_grad():
        for block in lm.layers[:layer]:
            out = block(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
    return h, pe


def policy_forward(lm, embeds: torch.Tensor, predictor: torch.nn.Module, span: slice, layer: int, tau: float):
    """The decoder ``lm`` on ``embeds`` (B, n, d): frozen layers up to ``layer``, the predictor's Gumbel decision
    there on the tokens at ``span`` (the image, or the answer), policy attention after.
    Returns (final hidden states, decisions (B, span length))."""
    h, pe = frozen_prefix(lm, embeds, layer)
    b, n, _ = h.shape
    logits = predictor(h[:, span])
    keep = F.gumbel_softmax(F.log_softmax(logits, -1), tau=tau, hard=True)[..., 0]  # (B, n_span)
    policy = torch.cat([torch.ones(b, span.start), keep, torch.ones(b, n - span.stop)], 1)
    for block in lm.layers[layer:]:
        h = policy_layer(block, h, pe, policy)
    return lm.norm(h), keep


def optimise(predictor: torch.nn.Module, step_loss, *, steps: int, lr: float, keep_rate: float, desc: str,
             smooth: float = 0.98, log_every: int = 25) -> tuple[float, float]:
    """The official optimisation of a predictor: AdamW (lr, no weight decay), warm-up over 3 % of the steps then
    cosine, Gumbel temperature 1 -> 0.1 linear; ``step_loss(step, tau)`` returns (answer CE, decisions (B, n));
    loss = CE + 100 x (``keep_rate`` - each sample's mean decision)^2. Returns the (EMA CE, EMA keep rate)."""
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, max(1, int(0.03 * steps)))
    ema, rate = None, None
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step in bar:
        tau = 1.0 + (0.1 - 1.0) * step / max(1, steps - 1)
        ce, keep = step_loss(step, tau)
        loss = ce + MASK_LOSS_WEIGHT * ((keep_rate - keep.mean(1)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = ce.item() if ema is None else smooth * ema + (1 - smooth) * ce.item()
        rate = keep.mean().item() if rate is None else smooth * rate + (1 - smooth) * keep.mean().item()
        if step % log_every == 0:
            bar.set_postfix(ce=f"{ema:.3f}", keep=f"{rate:.3f}", tau=f"{tau:.2f}")
    return ema, rate


def save_predictor(predictor: torch.nn.Module, out: Path, stem: str, info: dict) -> Path:
    """``stem``.pt (the weights) + ``stem``.json (``info`` and the predictor's dims) in ``out``; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(predictor.state_dict(), out / f"{stem}.pt")
    (out / f"{stem}.json").write_text(json.dumps({"dims": predictor.dims, **info}, indent=1))
    return out


def train_dynamic(model_name: str = "tiny-llava-deep", steps: int = 600, batch_size: int = 32, lr: float = 2e-4,
                  d_model: int = 128, seed: int = 0, out: Path | str | None = None) -> Path:
    """Train a vision predictor on the frozen ``model_name`` (an embedded tiny VLM); writes it beside the
    checkpoint (or into ``out``) and returns that folder."""
    from mmlab.arch.tiny_llava import CHECKPOINT_DIR
    from mmlab.models import load
    from mmlab.tiny.train import image_embeds, image_features, make_batch

    bundle = load(model_name)
    model, tokenizer = bundle.model, bundle.tokenizer
    for prm in model.parameters():
        prm.requires_grad_(False)
    torch.manual_seed(seed)
    d = model.config.text_config.hidden_size
    predictor = VisionPredictor(d, d_model=d_model, heads=8, ff=4 * d_model).train()
    layer = round(SPARSE_LAYER * len(model.model.language_model.layers))
    system, n_img = getattr(model.config, "mmlab_system_prompt", None), model.config.image_seq_length

    def step_loss(step: int, tau: float):
        ids, labels, px, _, image_index = make_batch(tokenizer, range(step * (batch_size // 4), (step + 1)
                                                                      * (batch_size // 4)), seed + 11, n_img, system)
        where = torch.nonzero(ids[0] == model.config.image_token_id).flatten()
        img = slice(int(where[0]), int(where[-1]) + 1)
        with torch.no_grad():
            embeds = image_embeds(model, ids, image_features(model, px)[image_index])
        hidden, keep = policy_forward(model.model.language_model, embeds, predictor, img, layer, tau)
        logits = model.lm_head(hidden)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)), keep

    t0 = time.time()
    ema, rate = optimise(predictor, step_loss, steps=steps, lr=lr, keep_rate=VISION_KEEP_RATE,
                         desc=f"train-tiny --dynamic {model_name}")
    out = save_predictor(predictor, Path(out or CHECKPOINT_DIR / model_name), "dynamic_llava", {
        "model": model_name, "layer": layer, "sparse_layer_fraction": SPARSE_LAYER,
        "vision_keep_rate": VISION_KEEP_RATE, "mask_loss_weight": MASK_LOSS_WEIGHT, "steps": steps,
        "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(time.time() - t0, 1),
        "final_ce": round(ema, 4), "final_keep_rate": round(rate, 4)})
    print(f"trained the Dynamic-LLaVA predictor on {model_name}: {steps} steps in {time.time() - t0:.0f} s, "
          f"answer CE {ema:.4f}, keep rate {rate:.3f} -> {out}")
    return out


OUTPUT_TEXT_KEEP_RATE = 0.5  # official output_text_keep_rate
OUTPUT_TEXT_LEN_FOR_TRAINING = 50  # official: shorter answers keep every token and get no rate target


def train_dynamic_text(model_name: str = "smollm2-135m", steps: int = 150, batch_size: int = 8, prompt: int = 64,
                       answer: int = 128, lr: float = 2e-4, d_model: int = 256, seed: int = 0,
                       out: Path | str | None = None) -> Path:
    """Train Dynamic-LLaVA's output-text predictor on the frozen text LM ``model_name`` (SmolLM2): windows of
    ``prompt`` + ``answer`` tokens from the calibration text (never the perplexity texts); the answer's tokens
    are the 'generated' ones the predictor thins. Writes ``dynamic_llava_text.pt`` + ``.json`` (default: beside
    the package's predictors for that model) and returns the folder."""
    from mmlab.arch.tiny_llava import CHECKPOINT_DIR
    from mmlab.data.text import calibration_windows
    from mmlab.methods.kv_cache import TextPredictor
    from mmlab.models import load

    if answer < OUTPUT_TEXT_LEN_FOR_TRAINING:
        raise ValueError(f"answer must be >= {OUTPUT_TEXT_LEN_FOR_TRAINING} tokens (the official rule gives shorter "
                         f"answers no keep-rate target), got {answer}")
    bundle = load(model_name)
    model = bundle.model
    for prm in model.parameters():
        prm.requires_grad_(False)
    torch.manual_seed(seed)
    lm = model.model
    predictor = TextPredictor(model.config.hidden_size, d_model=d_model).train()
    layer = round(SPARSE_LAYER * len(lm.layers))
    windows = torch.stack(calibration_windows(bundle.tokenizer, steps * batch_size, prompt + answer, "mixed"))
    span = slice(prompt, prompt + answer)

    def step_loss(step: int, tau: float):
        ids = windows[step * batch_size:(step + 1) * batch_size]
        hidden, keep = policy_forward(lm, lm.embed_tokens(ids), predictor, span, layer, tau)
        logits = model.lm_head(hidden[:, prompt - 1:-1])  # the answer's tokens, predicted
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, prompt:].reshape(-1)), keep

    t0 = time.time()
    ema, rate = optimise(predictor, step_loss, steps=steps, lr=lr, keep_rate=OUTPUT_TEXT_KEEP_RATE,
                         desc=f"train-tiny --dynamic-text {model_name}", smooth=0.95, log_every=10)
    out = save_predictor(predictor, Path(out or CHECKPOINT_DIR / model_name), "dynamic_llava_text", {
        "model": model_name, "layer": layer, "sparse_layer_fraction": SPARSE_LAYER,
        "output_text_keep_rate": OUTPUT_TEXT_KEEP_RATE, "mask_loss_weight": MASK_LOSS_WEIGHT, "steps": steps,
        "batch_size": batch_size, "prompt": prompt, "answer": answer, "data": "calibration_windows(mixed)",
        "lr": lr, "seed": seed, "seconds": round(time.time() - t0, 1), "final_ce": round(ema, 4),
        "final_keep_rate": round(rate, 4)})
    print(f"trained the Dynamic-LLaVA output-text predictor on {model_name}: {steps} steps in {time.time() - t0:.0f} "
          f"s, answer CE {ema:.4f}, keep rate {rate:.3f} -> {out}")
    return out


def keep_margin(bundle, rate: float, n: int = 16, prompt: int = 64, answer: int = 128) -> float:
    """The ``margin`` at which the bundle's output-text predictor keeps ``rate`` of the 'answer' tokens of ``n``
    calibration windows (as in its training, never the evaluation texts): the keep - drop logit quantile there."""
    from mmlab.data.text import calibration_windows

    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate!r}")
    predictor = bundle.extras["dynamic_llava_text"]
    layer = round(SPARSE_LAYER * bundle.n_layers)
    ids = torch.stack(calibration_windows(bundle.tokenizer, n, prompt + answer, "mixed"))
    with torch.no_grad():
        h = bundle.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][:, prompt:]
        logits = predictor(h).float().flatten(0, 1)
    return float((logits[:, 0] - logits[:, 1]).quantile(1 - rate))
