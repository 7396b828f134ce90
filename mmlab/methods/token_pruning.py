"""Visual-token pruning before the LLM. The family grows in its own issue (FastV, DivPrune, AIM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmlab.methods.base import Method, check_ratio, keep_count, register


@register
@dataclass
class RandomPrune(Method):
    """Random visual-token pruning: the baseline every pruning paper reports.

    Rule: keep a uniformly random ``keep_ratio`` subset of each image's projected tokens
    (spatial order preserved), drop the rest before the LLM; positions are renumbered.
    """

    name = "random"
    family = "token_pruning"
    needs_image = True
    keep_ratio: float = 0.25
    seed: int = 0

    def validate(self, ctx) -> None:
        check_ratio(self.name, self.keep_ratio)
        super().validate(ctx)

    def image_features(self, ctx, feats):
        gen = torch.Generator().manual_seed(self.seed + ctx.sample_index)
        out = []
        for i, f in enumerate(feats):
            k = keep_count(f.shape[0], self.keep_ratio)
            kept = torch.randperm(f.shape[0], generator=gen)[:k].sort().values.to(f.device)
            ctx.record_image_selection(i, kept)
            out.append(f.index_select(0, kept))
        return out
