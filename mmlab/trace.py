"""Trace: everything one engine run did, the single source for figures and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Trace:
    """Record of one ``mmlab.run``.

    Sequence indices ("source" indices) refer to the *assembled* prompt before any
    method acted: text tokens and every image's full set of visual tokens in order.
    """

    answer: str = ""
    answer_ids: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (vocab,) last-prompt-token logits of the prefill
    step_logits: list[torch.Tensor] = field(default_factory=list)  # one (vocab,) per decoded token
    all_logits: torch.Tensor | None = None  # (L, vocab) when requested (perplexity)
    methods: list[str] = field(default_factory=list)
    # the prompt as assembled before methods: -1 for text, k for a token of image k
    modality: torch.Tensor | None = None
    image_grid: tuple[int, int] | None = None  # (rows, cols) of one image's visual tokens
    n_image_tokens_in: int = 0  # visual tokens the vision tower produced (all images)
    # what the image_features stage kept: image -> kept token indices within that image
    image_kept: dict[int, torch.Tensor] = field(default_factory=dict)
    # merges: image -> (n_i,) tensor giving for every original token the kept slot it went into
    image_merged_into: dict[int, torch.Tensor] = field(default_factory=dict)
    # per decoder layer of the prefill: source indices of the tokens that entered it
    layer_tokens: list[torch.Tensor] = field(default_factory=list)
    # per decoder layer: KV length held after the prefill, before / after the after_prefill methods
    kv_lengths_prefill: list[int] = field(default_factory=list)
    kv_lengths_final: list[int] = field(default_factory=list)
    # per decode step: KV length per layer that step attended over
    decode_kv_lengths: list[list[int]] = field(default_factory=list)
    kv_bytes: int = 0  # bytes of the cache tensors held after prefill + after_prefill methods
    kv_bytes_final: int = 0  # ... and at the end of decoding
    # layers whose attention a method restricted (Tokens.restrict): layer -> {"pairs": allowed (query, key)
    # pairs, "gated": (token, head) outputs cut, both per head on average; "own_pairs": the layer's own
    # causal (windowed) pattern's pairs}
    restricted: dict[int, dict[str, float]] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (heads, q, k) probs
    timings: dict[str, float] = field(default_factory=dict)  # prefill_ms, decode_ms_per_token, ...
    dims: dict[str, int] = field(default_factory=dict)  # model dimensions the FLOPs counter needs
    extra: dict[str, Any] = field(default_factory=dict)  # methods' own records

    @property
    def tokens_per_layer(self) -> list[int]:
        return [int(t.numel()) for t in self.layer_tokens]

    @property
    def prompt_length(self) -> int:
        return 0 if self.modality is None else int(self.modality.numel())

    def image_tokens_per_layer(self) -> list[int]:
        is_img = self.modality >= 0
        return [int(is_img[t].sum()) for t in self.layer_tokens]

    @property
    def flops(self) -> dict[str, float]:
        from mmlab.flops import trace_flops

        return trace_flops(self)

    @property
    def prefill_flops(self) -> float:
        return self.flops["prefill"]

    def summary(self) -> dict[str, Any]:
        """A flat dict for tables and the batch runner."""
        f = self.flops
        return {
            "answer": self.answer, "prompt_tokens": self.prompt_length,
            "image_tokens_in": self.n_image_tokens_in,
            "image_tokens_layer0": self.image_tokens_per_layer()[0] if self.layer_tokens else 0,
            "mean_tokens_per_layer": sum(self.tokens_per_layer) / max(1, len(self.layer_tokens)),
            "prefill_tflops": f["prefill"] / 1e12, "decode_tflops": f["decode"] / 1e12,
            "kv_bytes": self.kv_bytes, **{k: v for k, v in self.timings.items()},
        }

    def __repr__(self) -> str:
        return (f"Trace(answer={self.answer!r}, methods={self.methods}, tokens/layer={self.tokens_per_layer}, "
                f"kv_bytes={self.kv_bytes}, prefill_ms={self.timings.get('prefill_ms', float('nan')):.1f})")
