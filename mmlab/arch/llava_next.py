"""LLaVA-NeXT and LLaVA-OneVision: "anyres" images, i.e. a base view plus high-resolution crops,
unpadded and laid out with a learned newline token after every row of tokens. One image's
tokens (newlines included) form one contiguous run of placeholders; there is no single 2-D grid
(``image_grid`` is None), so grid-based methods (``pool``) refuse these models."""

from __future__ import annotations

from mmlab.arch.base import Inputs, register
from mmlab.arch.vlm import VisionLanguageAdapter


@register
class LlavaNext(VisionLanguageAdapter):
    name = "llava_next"
    model_types = ("llava_next", "llava_onevision")
    attention_classes = ("LlamaAttention", "MistralAttention", "Qwen2Attention")

    def feature_kwargs(self, inputs: Inputs) -> dict:
        # vision_feature_layer / select strategy / OneVision's aspect-ratio rule come from the config
        return {k: v for k, v in inputs.extra.items() if k in ("image_sizes", "batch_num_images")}
