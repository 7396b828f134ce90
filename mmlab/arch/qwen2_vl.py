"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT whose 2x2 neighbouring patches are merged
into one visual token, and M-RoPE: every position is (temporal, height, width), so a visual
token's position encodes where it sits in the image (``positions`` -> (3, 1, L)).

After image-feature methods shorten the prompt, kept tokens keep their original (t, h, w)
positions (renumbering would scramble the 2-D layout M-RoPE encodes). Qwen2.5-VL differs in
the vision tower only (window attention, RMSNorm, SwiGLU), which ``get_image_features`` runs."""

from __future__ import annotations

import torch

from mmlab.arch.base import Inputs, register
from mmlab.arch.vlm import VisionLanguageAdapter


@register
class Qwen2VL(VisionLanguageAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    attention_classes = ("Qwen2VLAttention", "Qwen2_5_VLAttention")

    def feature_kwargs(self, inputs: Inputs) -> dict:
        return {"image_grid_thw": inputs.extra["image_grid_thw"]}

    def image_grid(self, inputs: Inputs) -> tuple[int, int]:
        t, h, w = inputs.extra["image_grid_thw"][0].tolist()
        s = self.model.config.vision_config.spatial_merge_size
        return h // s, w // s

    def positions(self, inputs: Inputs) -> torch.Tensor:
        pos, _ = self.model.model.get_rope_index(inputs.input_ids, image_grid_thw=inputs.extra.get("image_grid_thw"),
                                                 mm_token_type_ids=inputs.extra.get("mm_token_type_ids"))
        return pos

    def pruned_positions(self, inputs: Inputs, source: torch.Tensor) -> torch.Tensor:
        return self.positions(inputs).index_select(-1, source)
