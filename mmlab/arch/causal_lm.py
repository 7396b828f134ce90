"""Decoder-only language models with Llama's layer layout: Llama (SmolLM2), Mistral, Qwen2, Qwen3.

Their attention differs only in what ``Adapter.attention_logits`` reads off the module:
Qwen3 normalises each query head (``q_norm``) before RoPE; Mistral / Qwen2 / Qwen3 may use a
sliding window on some layers (``sliding_window``), which the mask and the recompute follow.
"""

from __future__ import annotations

from mmlab.arch.base import Adapter, register


@register
class CausalLM(Adapter):
    name = "causal_lm"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    query_after = True
    attention_classes = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
