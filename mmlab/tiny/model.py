"""tiny-llava: a LLaVA-architecture model small enough to train on a CPU.

``LlavaForConditionalGeneration`` = CLIP-style ViT (96 px images, 8 px patches -> 144
patch tokens, CLS dropped as LLaVA-1.5's "default" strategy does) + 2-layer GELU
projector + a small Llama decoder, with a word-level tokenizer over the shapes
vocabulary. Everything here is built from configs, nothing is downloaded.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from mmlab.data.shapes import IMAGE_SIZE, vocabulary

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "user", "assistant", ":"]
PATCH = 8
# tiny-llava-deep's system turn (24 words): text every prompt carries before the image, as a real chat model's
SYSTEM = ("you are a careful visual assistant . look at the image and answer the question about its coloured "
          "shapes with one word .")


def build_tokenizer(system: str | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer over the shapes vocabulary (+ ``system`` and the words of ``system``)."""
    extra = sorted(set(system.split()) - set(vocabulary()) - set(SPECIAL)) if system else []
    vocab = {w: i for i, w in enumerate(SPECIAL + vocabulary() + (["system"] + extra if system else []))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=512,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, *, text_layers: int = 4, hidden: int = 128,
                 system: str | None = None) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=False,
        **({"mmlab_system_prompt": system} if system else {}),
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **kw) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tokenizer, **kw))
    return model.eval()
