"""Gemma 3 text models (``Gemma3ForCausalLM``).

What differs from Llama's layout, and where the adapter follows it:
- two rotary tables, one per layer type (local sliding-window layers, global layers);
- sliding-window attention on the local layers (mask in prefill / decode and in the recompute);
- per-head ``q_norm`` / ``k_norm``, queries scaled by ``query_pre_attn_scalar ** -0.5``, optional
  attention-logit softcapping (all read off the attention module by ``attention_logits``);
- four norms per layer (post-attention and pre/post-feedforward), so p-MoD's weighted update
  is written for that layout;
- optional final-logit softcapping on the LM head.
"""

from __future__ import annotations

import torch

from mmlab.arch.base import Adapter, register


@register
class Gemma3Text(Adapter):
    name = "gemma3_text"
    model_types = ("gemma3_text",)
    query_after = True
    attention_classes = ("Gemma3Attention",)

    def rotary(self, hidden, positions, layer: int):
        return self.decoder.rotary_emb(hidden, positions, self.decoder.config.layer_types[layer])

    def rotary_key(self, layer: int):
        return self.decoder.config.layer_types[layer]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = super().logits(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return out if cap is None else torch.tanh(out / cap) * cap

    def weighted_layer(self, layer: int, hidden, positions, pe, cache, w, mask=None):
        block = self.layers[layer]
        attn = block.self_attn(hidden_states=block.input_layernorm(hidden), attention_mask=mask,
                               position_ids=positions, past_key_values=cache, use_cache=True,
                               position_embeddings=pe)[0]
        h = hidden + block.post_attention_layernorm(attn)
        mlp = block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h)))
        return h + w[None, :, None].to(h.dtype) * mlp
