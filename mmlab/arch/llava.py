"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP ViT's patch tokens (penultimate layer,
CLS dropped) through an MLP projector, one square grid of visual tokens per image, 1-D RoPE."""

from __future__ import annotations

from mmlab.arch.base import Inputs, register
from mmlab.arch.vlm import VisionLanguageAdapter


@register
class Llava(VisionLanguageAdapter):
    name = "llava"
    model_types = ("llava",)
    hf_class = "LlavaForConditionalGeneration"
    attention_classes = ("LlamaAttention", "MistralAttention", "Qwen2Attention")

    def feature_kwargs(self, inputs: Inputs) -> dict:
        cfg = self.model.config
        return {"vision_feature_layer": cfg.vision_feature_layer,
                "vision_feature_select_strategy": cfg.vision_feature_select_strategy}

    def image_grid(self, inputs: Inputs) -> tuple[int, int]:
        v = self.model.config.vision_config
        side = v.image_size // v.patch_size
        return side, side
