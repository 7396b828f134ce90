"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP ViT's patch tokens (penultimate layer,
CLS dropped) through an MLP projector, one square grid of visual tokens per image, 1-D RoPE."""

from __future__ import annotations

import torch

from mmlab.arch.base import Inputs, VisionStates, register
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

    @torch.inference_mode()
    def vision_states(self, inputs: Inputs) -> list[VisionStates]:
        """Per image, the vision tower's feature layer before the projector (CLS first), with that
        layer's [CLS] attention over the patches (summed over heads) and its keys (mean over heads),
        recomputed from the layer's input beside SDPA (the tower keeps its attention backend)."""
        tower = self.model.model.vision_tower
        hidden = tower(inputs.pixel_values, output_hidden_states=True).hidden_states  # (embeddings, layer 0, ...)
        layer = len(hidden) + self.model.config.vision_feature_layer - 1  # the layer whose output is the feature
        block = tower.encoder.layers[layer]
        attn, x = block.self_attn, block.layer_norm1(hidden[layer])  # (images, 1 + patches, d)
        b, n, _ = x.shape
        q = (attn.q_proj(x) * attn.scale).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)  # (images, heads, n, hd)
        probs = (q @ k.transpose(-1, -2)).softmax(-1)
        cls = probs[:, :, 0, 1:].sum(1)  # (images, patches)
        return [VisionStates(hidden[layer + 1][i], cls[i], k[i].mean(0)) for i in range(b)]

    @torch.inference_mode()
    def project(self, states: torch.Tensor) -> torch.Tensor:
        """The projector on tower states (rows without CLS): the LLM-space visual tokens."""
        return self.model.model.multi_modal_projector(states)
