"""Tiny random models of every supported architecture, built from configs (no downloads).

They exercise the same code paths as the real checkpoints users load on a GPU box
(Llama / Qwen2 / Qwen3 / Gemma3 LMs, LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL): processors, placeholder expansion, image-feature extraction, M-RoPE, q_norm,
sliding windows. Used by the tests and the ground-truth benchmark. One builder per
architecture in ``_builders()`` (and its name in ``ARCHITECTURES``); adding an architecture adds one here.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from mmlab.data.shapes import vocabulary
from mmlab.models import Bundle

_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "USER:", "ASSISTANT:"]
_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}{{ IMG }} "
             "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def word_tokenizer(image_token: str = "<image>") -> PreTrainedTokenizerFast:
    # the processors' video placeholders get ids of their own (else they alias <unk>, and every
    # unknown word of a real benchmark prompt would count as a video token)
    vocab = {w: i for i, w in enumerate(_SPECIAL + vocabulary() + ["<video>", "<|video_pad|>"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": image_token})


def _text_kw(tok, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False, **extra)


def image_only(processor_class):
    """A processor class without its video half: the video processor classes need torchvision,
    which has no CPU build beside torch 2.13 here. Images go through the stock code."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly


def _sdpa(model_class, cfg):
    cfg._attn_implementation = "sdpa"
    return model_class(cfg)


# --- text LMs -------------------------------------------------------------------------------------
def _causal_lm(config_class, model_class, **extra):
    def build(tok, text=None, vision=None):
        return _sdpa(model_class, config_class(**(_text_kw(tok, **extra) | (text or {})))), None
    return build


def _gemma3_text(tok, text=None, vision=None):
    """Local layers with a 6-token sliding window (shorter than the test prompts), then a global one."""
    import transformers as tf

    kw = _text_kw(tok, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return _sdpa(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**(kw | (text or {})))), None


# --- VLMs ---------------------------------------------------------------------------------------------
def _clip(vision: dict | None):
    import transformers as tf

    vkw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=32, patch_size=8) | (vision or {})
    return tf.CLIPVisionConfig(**vkw), vkw["image_size"], vkw["patch_size"]


def _llava(tok, text=None, vision=None):
    import transformers as tf

    vcfg, side, patch = _clip(vision)
    cfg = tf.LlavaConfig(vision_config=vcfg, text_config=tf.LlamaConfig(**(_text_kw(tok) | (text or {}))),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
                         vision_feature_layer=-1, tie_word_embeddings=False, image_seq_length=(side // patch) ** 2)
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=_TEMPLATE.replace("{{ IMG }}", "<image>"))
    return _sdpa(tf.LlavaForConditionalGeneration, cfg), proc


def _llava_next(tok, text=None, vision=None):
    import transformers as tf

    vcfg, side, patch = _clip(vision)
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    cfg = tf.LlavaNextConfig(vision_config=vcfg, text_config=tf.LlamaConfig(**(_text_kw(tok) | (text or {}))),
                             image_token_id=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default", vision_feature_layer=-1,
                             tie_word_embeddings=False, image_grid_pinpoints=pinpoints,
                             image_seq_length=16)
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": side, "width": side},
                                       image_grid_pinpoints=pinpoints)
    proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=_TEMPLATE.replace("{{ IMG }}", "<image>"))
    return _sdpa(tf.LlavaNextForConditionalGeneration, cfg), proc


def _llava_onevision(tok, text=None, vision=None):
    """SigLIP tower (no CLS, "full" features), Qwen2 LLM, anyres_max_9 crops with newline tokens."""
    import transformers as tf

    vkw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8) | (vision or {})
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**vkw),
                                  text_config=tf.Qwen2Config(**(_text_kw(tok) | (text or {}))),
                                  image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  tie_word_embeddings=False)
    ip = tf.LlavaOnevisionImageProcessorPil(size={"height": vkw["image_size"], "width": vkw["image_size"]},
                                            image_grid_pinpoints=pinpoints)
    proc = image_only(tf.LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=(vkw["image_size"] // vkw["patch_size"]) ** 2,
        vision_feature_select_strategy="full", chat_template=_TEMPLATE.replace("{{ IMG }}", "<image>"))
    return _sdpa(tf.LlavaOnevisionForConditionalGeneration, cfg), proc


def _qwen_vl(config_class, model_class, processor_class, vision: dict):
    def build(tok, text=None, vision_over=None):
        import transformers as tf

        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        cfg = config_class(text_config=_text_kw(tok, rope_parameters=rope) | (text or {}),
                           vision_config=vision | (vision_over or {}),
                           image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                           vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                           vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False)
        ip = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 4, patch_size=14, merge_size=2,
                                         temporal_patch_size=2)
        proc = image_only(processor_class)(image_processor=ip, tokenizer=tok,
                                           chat_template=_TEMPLATE.replace("{{ IMG }}", QWEN_IMAGE))
        return _sdpa(model_class, cfg), proc
    return build


def _builders() -> dict:
    import transformers as tf

    return {
        "llama": _causal_lm(tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": _causal_lm(tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": _causal_lm(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=16),
        "gemma3_text": _gemma3_text,
        "llava": _llava,
        "llava_next": _llava_next,
        "llava_onevision": _llava_onevision,
        "qwen2_vl": _qwen_vl(tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor,
                             dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)),
        "qwen2_5_vl": _qwen_vl(tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor,
                               dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                                    spatial_merge_size=2, temporal_patch_size=2, in_chans=3, out_hidden_size=64,
                                    window_size=56, fullatt_block_indexes=[1])),
    }


ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3_text", "llava", "llava_next", "llava_onevision", "qwen2_vl",
                 "qwen2_5_vl")
TEXT_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3_text")


def random_bundle(arch: str, seed: int = 0, *, text: dict | None = None, vision: dict | None = None,
                  attn: str = "sdpa") -> Bundle:
    """A Bundle around a tiny randomly initialised model of ``arch`` (one of ARCHITECTURES).

    ``text`` / ``vision`` override config fields, e.g. a SmolLM2-135M-sized LLM behind a 336 px /
    14 px CLIP tower (576 visual tokens) for speed benchmarks. ``attn="eager"`` gives the same
    weights (same seed) on transformers' eager attention: the reference for recomputed scores.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {ARCHITECTURES}")
    torch.manual_seed(seed)
    tok = word_tokenizer("<|image_pad|>" if arch.startswith("qwen2") and arch.endswith("vl") else "<image>")
    model, proc = _builders()[arch](tok, text, vision)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return Bundle.from_model(model, tok, proc, name=f"random-{arch}", max_new_tokens=4)
