"""Tiny random models of every supported architecture, built from configs (no downloads).

They exercise the same code paths as the real checkpoints users load on a GPU box
(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Llama / Qwen2 LMs): processors, placeholder
expansion, image-feature extraction, M-RoPE. Used by the tests and the ground-truth
benchmark.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from mmlab.data.shapes import vocabulary
from mmlab.models import Bundle

ARCHITECTURES = ("llama", "qwen2", "llava", "llava_next", "qwen2_vl")
_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "USER:", "ASSISTANT:"]
_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}{{ IMG }} "
             "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")


def word_tokenizer(image_token: str = "<image>") -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(_SPECIAL + vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": image_token})


def _text_kw(tok, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False, **extra)


def _image_only_qwen2vl_processor_class():
    import transformers as tf

    class ImageOnlyQwen2VLProcessor(tf.Qwen2VLProcessor):
        """Qwen2-VL's processor without its video half: the video processor class needs
        torchvision, which has no CPU build here. Images go through the stock code."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor


def random_bundle(arch: str, seed: int = 0, *, text: dict | None = None, vision: dict | None = None) -> Bundle:
    """A Bundle around a tiny randomly initialised model of ``arch`` (one of ARCHITECTURES).

    ``text`` / ``vision`` override config fields for the LLaVA architectures, e.g. a
    SmolLM2-135M-sized LLM behind a 336 px / 14 px CLIP tower (576 visual tokens) for speed
    benchmarks.
    """
    import transformers as tf

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {ARCHITECTURES}")
    torch.manual_seed(seed)
    tok = word_tokenizer("<|image_pad|>" if arch == "qwen2_vl" else "<image>")
    if arch in ("llama", "qwen2"):
        cfg = (tf.LlamaConfig if arch == "llama" else tf.Qwen2Config)(**_text_kw(tok))
        cfg._attn_implementation = "sdpa"
        model = (tf.LlamaForCausalLM if arch == "llama" else tf.Qwen2ForCausalLM)(cfg)
        return Bundle.from_model(model, tok, name=f"random-{arch}", max_new_tokens=4)

    image_token = "<|image_pad|>" if arch == "qwen2_vl" else "<image>"
    img_id = tok.convert_tokens_to_ids(image_token)
    if arch == "qwen2_vl":
        _ImageOnlyQwen2VLProcessor = _image_only_qwen2vl_processor_class()
        cfg = tf.Qwen2VLConfig(
            text_config=_text_kw(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
            image_token_id=img_id, vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        model = tf.Qwen2VLForConditionalGeneration(cfg)
        ip = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 4, patch_size=14,
                                         merge_size=2, temporal_patch_size=2)
        proc = _ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok,
                                   chat_template=_TEMPLATE.replace("{{ IMG }}", "<|vision_start|><|image_pad|><|vision_end|>"))
    else:
        vkw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8) | (vision or {})
        vision_cfg = tf.CLIPVisionConfig(**vkw)
        side, patch = vkw["image_size"], vkw["patch_size"]
        common = dict(vision_config=vision_cfg, text_config=tf.LlamaConfig(**(_text_kw(tok) | (text or {}))),
                      image_token_id=img_id, vision_feature_select_strategy="default", vision_feature_layer=-1,
                      tie_word_embeddings=False)
        crop = {"height": side, "width": side}
        if arch == "llava":
            cfg = tf.LlavaConfig(**common, image_seq_length=(side // patch) ** 2)
            ip = tf.CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=crop)
            cls, pcls = tf.LlavaForConditionalGeneration, tf.LlavaProcessor
        else:
            cfg = tf.LlavaNextConfig(**common, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], image_seq_length=16)
            ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size=crop,
                                               image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
            cls, pcls = tf.LlavaNextForConditionalGeneration, tf.LlavaNextProcessor
        cfg._attn_implementation = "sdpa"
        model = cls(cfg)
        proc = pcls(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1, chat_template=_TEMPLATE.replace("{{ IMG }}", "<image>"))
    return Bundle.from_model(model, tok, proc, name=f"random-{arch}", max_new_tokens=4)
