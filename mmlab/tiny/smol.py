"""Train smol-llava (``mmlab train-tiny --model smol-llava``): the real SmolLM2-135M-Instruct stays
frozen; mmlab trains the vision tower (started from tiny-llava's, itself pre-trained without an LLM
by the patch probe), a fresh projector into SmolLM2's embeddings, and rank-``rank`` deltas of every
linear of every layer.

Stage 1 (``align_projector``, no LLM): the projector learns to write each patch as SmolLM2's own
word embeddings of what the patch shows (the mean of " red", " circle", " small", " left"; " background"
elsewhere), so the frozen LLM starts from visual tokens it can already read. Stage 2: one multi-turn
conversation per scene (LLaVA's format: up to 8 questions the scene can host, one user / assistant
turn each, the image in the first turn), the loss on the answer words and ``<|im_end|>`` only, so one
pass through the 30 layers supervises up to eight answers. Fresh scenes every step from the training
stream; the ``test`` split is never touched. Resumable: the trainable state, optimizer and step are
saved every ``save_every`` steps to ``<out>/train_state.pt``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmlab.arch.smol_llava import LORA_TARGETS, build, prompt_text, turn
from mmlab.arch.tiny_llava import CHECKPOINT_DIR, pixel_values
from mmlab.data.shapes import COLORS, SHAPES, make_sample, patch_labels, scene_with_all_questions
from mmlab.tiny.train import image_embeds, image_features, warmup_cosine


class LoRA(torch.nn.Module):
    """A frozen linear plus a trainable low-rank delta: y = W x + scale * B A x (Hu et al., 2021; B = 0
    at the start, so training starts from SmolLM2 itself)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)


def add_lora(model, rank: int, alpha: float) -> dict[str, LoRA]:
    out = {}
    for name, mod in list(model.model.language_model.named_modules()):
        for t in LORA_TARGETS:
            child = getattr(mod, t, None)
            if isinstance(child, torch.nn.Linear):
                setattr(mod, t, LoRA(child, rank, alpha))
                out[f"model.language_model.{name}.{t}"] = getattr(mod, t)
    return out


def encode_conversation(tok, qas, n_image: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one scene's conversation (loss on each answer + ``<|im_end|>``)."""
    ids, labels = [], []
    for k, (q, a, _) in enumerate(qas):
        text = (prompt_text(q, n_image) if k == 0
                else f"\n<|im_start|>user\n{turn(q)}<|im_end|>\n<|im_start|>assistant\n")
        p = tok(text, add_special_tokens=False).input_ids
        t = tok(f"{a}<|im_end|>", add_special_tokens=False).input_ids
        ids += p + t
        labels += [-100] * len(p) + t
    return ids, labels


def batch(tok, indices, seed: int, n_image: int, pad: int):
    scenes = [scene_with_all_questions(i, seed, "train") for i in indices]
    pairs = [encode_conversation(tok, qas, n_image) for _, _, qas in scenes]
    width = max(len(i) for i, _ in pairs)
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in pairs])  # right padding: never attended to
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])
    return ids, labels, pixel_values([im for im, _, _ in scenes])


def lm_loss(model, ids, labels, px):
    embeds = image_embeds(model, ids, image_features(model, px))  # images: (144, 576) each
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    scored = labels[:, 1:] != -100  # logits only where an answer token is predicted (not vocabulary x sequence)
    logits = model.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:][scored])


def word_targets(tok, emb: torch.Tensor, scenes) -> torch.Tensor:
    """(images, patches, d): per patch, the mean of SmolLM2's input embeddings of its colour, shape,
    size and side words (" background" where no object is)."""
    def vec(words):
        return torch.stack([emb[tok(" " + w, add_special_tokens=False).input_ids[0]] for w in words])

    colors, shapes_, sizes, sides = vec(COLORS), vec(SHAPES), vec(["big", "small"]), vec(["left", "right"])
    out = []
    for objs in scenes:
        lab = {k: torch.from_numpy(v) for k, v in patch_labels(objs).items()}
        t = vec(["background"]).expand(lab["color"].numel(), -1).clone()
        on = lab["color"] > 0
        side = (lab["xbin"][on] >= lab["xbin"].new_tensor(6)).long()
        t[on] = (colors[lab["color"][on] - 1] + shapes_[lab["shape"][on] - 1] + sizes[lab["size"][on] - 1]
                 + sides[side]) / 4
        out.append(t)
    return torch.stack(out)


def align_projector(model, tok, steps: int, images: int, lr: float, seed: int) -> None:
    """Stage 1: the projector alone (tower frozen, no LLM) regresses each patch onto ``word_targets``."""
    emb = model.get_input_embeddings().weight.detach()
    proj = model.model.multi_modal_projector
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    for step in tqdm(range(steps), desc="smol-llava stage 1 (projector -> word embeddings)", mininterval=10):
        scenes = [scene_with_all_questions(20_000_000 + step * images + i, seed, "train") for i in range(images)]
        with torch.no_grad():
            feats = model.model.vision_tower(pixel_values([s[0] for s in scenes]), output_hidden_states=True)
            feats = feats.hidden_states[model.config.vision_feature_layer][:, 1:]  # CLS dropped, as LLaVA's "default"
        loss = torch.nn.functional.mse_loss(proj(feats), word_targets(tok, emb, [s[1] for s in scenes]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    print(f"stage 1: {steps} steps x {images} images, loss {loss.item():.2e}", flush=True)


@torch.no_grad()
def val_accuracy(model, tok, n: int = 96, seed: int = 0) -> dict[str, float]:
    """Teacher-forced accuracy of the first answer token on the ``val`` split, single-turn prompts."""
    samples = [make_sample(i, seed, "val") for i in range(n)]
    out: dict[str, list] = {}
    for s in samples:
        ids = tok(prompt_text(s.question, model.config.image_seq_length), add_special_tokens=False,
                  return_tensors="pt").input_ids
        want = tok(s.answer, add_special_tokens=False).input_ids[0]
        pred = model(input_ids=ids, pixel_values=pixel_values([s.image])).logits[0, -1].argmax().item()
        out.setdefault(s.qtype, []).append(pred == want)
    return {t: sum(v) / len(v) for t, v in out.items()}


def trainable_state(model, loras: dict[str, LoRA]) -> dict[str, torch.Tensor]:
    """What ships: the tower and projector, and the LoRA factors with their scale."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    lora = {}
    for name, m in loras.items():
        lora[f"{name}.lora_A"], lora[f"{name}.lora_B"] = m.lora_A.detach().clone(), m.lora_B.detach().clone()
        lora[f"{name}.scale"] = torch.tensor(m.scale)
    return {**state, **{"lora." + k: v for k, v in lora.items()}}


def save(model, loras, out: Path) -> None:
    state = trainable_state(model, loras)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in state.items() if not k.startswith("lora.")}, out / "model.safetensors")
    save_file({k.removeprefix("lora."): v for k, v in state.items() if k.startswith("lora.")}, out / "lora.safetensors")
    model.config.save_pretrained(out)


def train(lm_dir: Path, steps: int = 1000, images_per_step: int = 4, lr: float = 1e-3, vision_lr: float = 2e-4,
          rank: int = 8, alpha: float = 16.0, align_steps: int = 400, align_images: int = 32, seed: int = 0,
          out: Path | str = CHECKPOINT_DIR / "smol-llava",
          threads: int | None = None, eval_every: int = 150, save_every: int = 50, until: int | None = None) -> Path:
    """Train for ``steps`` steps (``until``: stop after that step, saved, to resume later). Returns the
    checkpoint folder (written when the last step is done)."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = build(Path(lm_dir), CHECKPOINT_DIR / "tiny-llava", lora=False)
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    loras = add_lora(model, rank, alpha)
    groups = [{"params": list(model.model.vision_tower.parameters()), "lr": vision_lr},
              {"params": list(model.model.multi_modal_projector.parameters()), "lr": lr},
              {"params": [p for m in loras.values() for p in (m.lora_A, m.lora_B)], "lr": lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, steps, max(1, steps // 30))
    state_file, start, ema, spent, losses, history = out / "train_state.pt", 0, None, 0.0, [], []
    if state_file.exists():
        st = torch.load(state_file, weights_only=False)
        model.load_state_dict({k: v for k, v in st["model"].items() if not k.startswith("lora.")}, strict=False)
        for name, m in loras.items():
            m.lora_A.data.copy_(st["model"][f"lora.{name}.lora_A"])
            m.lora_B.data.copy_(st["model"][f"lora.{name}.lora_B"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start, ema, spent, losses = st["step"], st["ema"], st["seconds"], st.get("losses", [])
        history = st.get("val", [])
        print(f"resuming {state_file} at step {start}", flush=True)
    elif align_steps:
        align_projector(model, tok, align_steps, align_images, lr, seed)
    model.train()
    t0 = time.time() - spent
    last = steps if until is None else min(until, steps)
    bar = tqdm(range(start, last), desc="train-tiny smol-llava", initial=start, total=steps, mininterval=10)
    for step in bar:
        idx = range(step * images_per_step, (step + 1) * images_per_step)
        loss = lm_loss(model, *batch(tok, idx, seed, model.config.image_seq_length, tok.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
        done = step + 1
        if eval_every and (done % eval_every == 0 or done == steps):
            model.eval()
            acc = val_accuracy(model, tok)
            model.train()
            history.append({"step": done, "seconds": round(time.time() - t0), "loss": ema, **acc})
            print(f"step {done} loss {ema:.3f} {time.time() - t0:.0f} s val "
                  + " ".join(f"{k}={v:.2f}" for k, v in sorted(acc.items())), flush=True)
        if done % save_every == 0 or done in (steps, last):
            torch.save({"model": trainable_state(model, loras), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": done, "ema": ema, "seconds": time.time() - t0, "losses": losses,
                        "val": history},
                       state_file.with_suffix(".tmp"))
            state_file.with_suffix(".tmp").replace(state_file)
    if last < steps:
        print(f"stopped after step {last} of {steps}; run again to resume from {state_file}")
        return out
    model.eval()
    save(model, loras, out)
    info = {"steps": steps, "images_per_step": images_per_step, "seconds": round(time.time() - t0), "rank": rank,
            "losses": [round(x, 4) for x in losses], "val": history}
    (out / "training.json").write_text(json.dumps(info, indent=1))
    state_file.unlink()  # optimizer state is for resuming only; the finished checkpoint ships without it
    print(f"trained {steps} steps x {images_per_step} scenes in {time.time() - t0:.0f} s, loss {ema:.4f} -> {out}")
    return out
