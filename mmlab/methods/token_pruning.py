"""Visual-token pruning and merging: before the LLM (random, pool, DivPrune, AIM's merge, VisionZip
inside the vision tower) and inside it (FastV, PyramidDrop, AIM's progressive pruning, SparseVLM's
text-rated stages with recycling, DPN's pyramid pooling).

Position conventions (what each paper's code does):

* before the LLM, the shortened image span is concatenated into the prompt, so 1-D RoPE
  models renumber positions 0..n-1 (LLaVA's own code path); M-RoPE models (Qwen2-VL)
  keep each kept or representative token's original (t, h, w) position;
* inside the LLM, tokens keep the positions they entered the LLM with (FastV's
  implementation keeps the original position ids); decoding continues at last + 1.

A merge records, per image, the representative token of every output slot (its
position is used) and, for every original token, the slot it went into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmlab.methods.base import Method, MethodError, check_ratio, keep_count, register


class VisualTokenMethod(Method):
    """Shared by the family: it needs image tokens, and a ``keep_ratio`` must be in (0, 1]."""

    family: ClassVar[str] = "token_pruning"
    knob: ClassVar[str] = "keep_ratio"
    needs_image: ClassVar[bool] = True

    def check(self) -> None:
        if hasattr(self, "keep_ratio"):
            check_ratio(self.name, self.keep_ratio)


@register
@dataclass
class RandomPrune(VisualTokenMethod):
    """Random visual-token pruning: the baseline every pruning paper reports.

    Rule: keep a uniformly random ``keep_ratio`` subset of each image's projected tokens
    (spatial order preserved), drop the rest before the LLM.
    """

    name = "random"
    keep_ratio: float = 0.25
    seed: int = 0

    def image_features(self, ctx, feats):
        gen = torch.Generator().manual_seed(self.seed + ctx.sample_index)
        out = []
        for i, f in enumerate(feats):
            k = keep_count(f.shape[0], self.keep_ratio)
            kept = torch.randperm(f.shape[0], generator=gen)[:k].sort().values.to(f.device)
            ctx.record_image_selection(i, kept)
            out.append(f.index_select(0, kept))
        return out


def pool_shape(rows: int, cols: int, k: int) -> tuple[int, int]:
    """Output grid (h, w) for pooling a rows x cols grid to about ``k`` tokens: the most square
    windows among the shapes within 10% (at least 1) of ``k`` tokens."""
    tol = max(1, int(0.1 * k))
    best = None
    for h in range(1, rows + 1):
        for w in range(1, cols + 1):
            if abs(h * w - k) > tol:
                continue
            # window aspect (rows/h : cols/w) closest to square, then closest count
            key = (abs(math.log((rows / h) / (cols / w))), abs(h * w - k))
            if best is None or key < best[0]:
                best = (key, (h, w))
    if best is None:  # k tokens cannot be laid out on this grid within tolerance: nearest count
        h = max(1, min(rows, round(math.sqrt(k * rows / cols))))
        return h, max(1, min(cols, round(k / h)))
    return best[1]


@register
@dataclass
class Pool(VisualTokenMethod):
    """Spatial average pooling of the visual-token grid (the resolution-reduction baseline).

    Rule: partition each image's rows x cols token grid into h x w contiguous windows
    (h * w ~ ``keep_ratio`` of the tokens, windows as square as possible) and replace each
    window by the mean of its tokens, before the LLM.
    """

    name = "pool"
    keep_ratio: float = 0.25

    def validate(self, ctx) -> None:
        super().validate(ctx)
        if ctx.image_grid is None:
            raise MethodError(f"pool needs a 2-D visual-token grid, and {ctx.model_name!r} has none "
                              f"(e.g. LLaVA-NeXT tiles with newline tokens); use divprune or random")

    def image_features(self, ctx, feats):
        rows, cols = ctx.image_grid
        out = []
        for i, f in enumerate(feats):
            if f.shape[0] != rows * cols:
                raise MethodError(f"pool: image {i} has {f.shape[0]} tokens, not the {rows}x{cols} grid of image 0")
            h, w = pool_shape(rows, cols, keep_count(f.shape[0], self.keep_ratio))
            # contiguous, non-overlapping windows: row r goes to window row floor(r * h / rows)
            win_r = torch.arange(rows, device=f.device) * h // rows
            win_c = torch.arange(cols, device=f.device) * w // cols
            slot = (win_r[:, None] * w + win_c[None, :]).flatten()  # (rows*cols,) window of each token
            sums = torch.zeros(h * w, f.shape[1], dtype=torch.float32, device=f.device).index_add_(0, slot, f.float())
            counts = torch.bincount(slot, minlength=h * w).clamp(min=1)
            pooled = (sums / counts[:, None]).to(f.dtype)
            # representative of a window: its token nearest the window's centre (positions for M-RoPE)
            cr = ((torch.arange(h) + 0.5) * rows / h).floor().long().clamp(max=rows - 1)
            cc = ((torch.arange(w) + 0.5) * cols / w).floor().long().clamp(max=cols - 1)
            rep = (cr[:, None] * cols + cc[None, :]).flatten().to(f.device)
            ctx.record_image_selection(i, rep, merged_into=slot)
            out.append(pooled)
        return out


def divprune_select(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy Max-Min diversity subset of ``k`` rows of ``feats`` (distance 1 - cosine), in pick order.

    First pick: the token whose nearest other token is farthest; then, repeatedly, the token
    whose minimum distance to the picked set is largest (DivPrune, Alg. 1).
    """
    x = F.normalize(feats.float(), dim=-1)
    dist = 1.0 - x @ x.T
    n = dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=feats.device)
    nearest = dist.topk(2, dim=0, largest=False).values[1]  # column's smallest after its own ~0 entry
    picks = [int(nearest.argmax())]
    min_dist = dist[picks[0]].clone()
    min_dist[picks[0]] = -float("inf")
    for _ in range(k - 1):
        j = int(min_dist.argmax())
        picks.append(j)
        min_dist = torch.minimum(min_dist, dist[j])
        min_dist[j] = -float("inf")
    return torch.tensor(picks, dtype=torch.long, device=feats.device)


@register
@dataclass
class DivPrune(VisualTokenMethod):
    """DivPrune (Alvar et al., CVPR 2025): diversity-based visual-token pruning.

    Rule: before the LLM, keep the subset of each image's projected tokens that solves the
    Max-Min Diversity Problem greedily on 1 - cosine distance (``divprune_select``).
    Paper default: keep ratio 0.098 (~56 of 576 tokens).
    """

    name = "divprune"
    keep_ratio: float = 0.098

    def image_features(self, ctx, feats):
        out = []
        for i, f in enumerate(feats):
            kept = divprune_select(f, keep_count(f.shape[0], self.keep_ratio)).sort().values
            ctx.record_image_selection(i, kept)
            out.append(f.index_select(0, kept))
        return out


def _check_layer(name: str, layer, n_layers: int, what: str = "layer") -> None:
    if not isinstance(layer, int) or not 1 <= layer < n_layers:
        raise MethodError(f"{name}: {what} must be an integer in 1..{n_layers - 1} (scores come from the layer "
                          f"before it; this model has {n_layers} layers), got {layer!r}")


def prune_by_last_token_attention(ctx, layer: int, tokens, n_keep: int) -> None:
    """Keep all text tokens and the ``n_keep`` visual tokens that the last prompt token attends
    to most (head mean) in ``layer - 1``; drop the other visual tokens."""
    img = torch.nonzero(tokens.is_image).flatten()
    if img.numel() <= n_keep:
        return
    scores = ctx.attention(layer - 1, queries=[-1])[:, 0].mean(0)  # (n,)
    if scores.numel() != len(tokens):
        raise MethodError("fastv / pdrop rank by the previous layer's attention over every live token, but that "
                          "layer processed only some of them (mod routing); prune at a layer after a dense one")
    top = img[scores[img].topk(n_keep).indices]
    tokens.keep(torch.cat([torch.nonzero(~tokens.is_image).flatten(), top]))


@register
@dataclass
class FastV(VisualTokenMethod):
    """FastV (Chen et al., ECCV 2024): an image is worth 1/2 tokens after layer 2.

    Rule: at layer K, rank the visual tokens by the attention the last prompt token gives
    them in layer K-1 (mean over heads) and drop the lowest; the paper's R (fraction
    dropped) is ``1 - keep_ratio``. Paper defaults K=2, R=50%. Kept tokens keep their
    original positions. Scores are computed for layer K-1 only (the model stays on SDPA).
    """

    name = "fastv"
    layer: int = 2
    keep_ratio: float = 0.5

    def check(self) -> None:
        super().check()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise MethodError(f"{self.name}: layer must be an integer >= 1 (scores come from the layer before it), "
                              f"got {self.layer!r}")

    def validate(self, ctx) -> None:
        super().validate(ctx)
        _check_layer(self.name, self.layer, ctx.n_layers)

    def before_layer(self, ctx, layer, tokens):
        if layer == self.layer:
            n_img = int(tokens.is_image.sum())
            prune_by_last_token_attention(ctx, layer, tokens, keep_count(n_img, self.keep_ratio) if n_img else 0)


@register
@dataclass
class PyramidDrop(VisualTokenMethod):
    """PyramidDrop (Xing et al., CVPR 2025): stage-wise visual-token dropping.

    Rule: the LLM is split into stages at ``layers``; at the start of each stage keep the
    fraction ``ratio`` of the visual tokens still present, ranked by the attention of the
    last prompt token in the layer before (FastV's score). Paper defaults for 32-layer
    LLaVA-1.5: stages at 8, 16, 24, ratio 0.5; here the boundaries are fractions of depth.
    """

    name = "pdrop"
    knob = "ratio"
    layers: tuple = (0.25, 0.5, 0.75)  # stage boundaries as fractions of the depth
    ratio: float = 0.5

    def stage_layers(self, n_layers: int) -> list[int]:
        return sorted({max(1, min(n_layers - 1, round(f * n_layers))) for f in self.layers})

    def check(self) -> None:
        check_ratio(self.name, self.ratio, "ratio")
        if not self.layers or any(not isinstance(f, (int, float)) or not 0 < f < 1 for f in self.layers):
            raise MethodError(f"pdrop: layers must be stage boundaries as fractions of depth in (0, 1), "
                              f"got {self.layers!r}")

    def before_layer(self, ctx, layer, tokens):
        if layer in self.stage_layers(ctx.n_layers):
            n_img = int(tokens.is_image.sum())
            prune_by_last_token_attention(ctx, layer, tokens, keep_count(n_img, self.ratio) if n_img else 0)


def bipartite_merge(x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe-style bipartite soft matching, repeated until ``target`` tokens remain.

    Each round splits the tokens alternately into sets A (even) and B (odd), links every A
    token to its most cosine-similar B token, and averages the r best-linked A tokens into
    their B partners (r <= half the tokens per round). Returns the merged tokens (spatial
    order of their representatives), the representative original index of each, and for
    every original token the index of the merged token it went into.
    """
    n0 = x.shape[0]
    rep = torch.arange(n0, device=x.device)  # representative original token of each current token
    slot_of = torch.arange(n0, device=x.device)  # current token each original token lives in
    x = x.float()
    while x.shape[0] > target:
        n = x.shape[0]
        r = min(n - target, n // 2)
        a, b = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
        xn = F.normalize(x, dim=-1)
        best, partner = (xn[a] @ xn[b].T).max(dim=-1)
        order = best.argsort(descending=True)
        src, unm = order[:r], order[r:]
        merged_b = x[b].scatter_reduce(0, partner[src, None].expand(-1, x.shape[1]), x[a[src]],
                                       reduce="mean", include_self=True)
        new_rep = torch.cat([rep[a[unm]], rep[b]])
        new_x = torch.cat([x[a[unm]], merged_b])
        perm = new_rep.argsort()  # back to spatial order of representatives
        where = torch.empty_like(perm)
        where[perm] = torch.arange(perm.numel(), device=x.device)  # index in the sorted sequence
        new_index = torch.empty(n, dtype=torch.long, device=x.device)
        new_index[a[unm]] = where[: unm.numel()]
        new_index[b] = where[unm.numel():]
        new_index[a[src]] = where[unm.numel() + partner[src]]
        x, rep, slot_of = new_x[perm], new_rep[perm], new_index[slot_of]
    return x, rep, slot_of


def pagerank_importance(logits: torch.Tensor, tau: float, iters: int) -> torch.Tensor:
    """AIM's multimodal importance: PageRank-like iteration on the attention map.

    ``logits`` (heads, n, n) are causal pre-softmax scores; M = softmax(logits / tau); start from
    the uniform distribution and apply ``dist <- dist @ M`` ``iters`` times; the score of a token
    is the root-mean-square over heads of its mass.
    """
    m = (logits / tau).softmax(-1)
    n = m.shape[-1]
    dist = torch.full((m.shape[0], 1, n), 1.0 / n, dtype=m.dtype, device=m.device)
    for _ in range(iters):
        dist = dist @ m
    return dist.pow(2).mean(0).sqrt()[0]


@register
@dataclass
class AIM(VisualTokenMethod):
    """AIM (Zhong et al., ICCV 2025): adaptive inference by token merging and pruning.

    Rule: (a) before the LLM, iterative bipartite merging of each image's tokens by embedding
    cosine similarity down to ``keep_ratio`` (paper: 576 -> 252, 0.4375); (b) inside the LLM,
    text tokens are always kept and the visual tokens entering layer l are cut to
    retention(l) of those that entered the LLM, by PageRank importance of layer l-1's
    attention (softmax temperature ``tau``, ``iters`` iterations). retention falls linearly
    from 1 at relative depth ``prune_from`` to 0 at ``prune_to`` (paper, 32 layers: from
    layer 13 in steps of 0.125, i.e. 13/32 -> 21/32). ``prune_from=1`` disables (b).
    """

    name = "aim"
    keep_ratio: float = 0.4375
    prune_from: float = 13 / 32
    prune_to: float = 21 / 32
    tau: float = 0.1
    iters: int = 5

    def retention(self, layer: int, n_layers: int) -> float:
        depth = layer / n_layers
        return min(1.0, max(0.0, (self.prune_to - depth) / (self.prune_to - self.prune_from)))

    def check(self) -> None:
        super().check()
        if not (0 <= self.prune_from <= 1 and self.prune_to > self.prune_from):
            raise MethodError(f"aim: need 0 <= prune_from <= 1 and prune_to > prune_from (relative depths), "
                              f"got prune_from={self.prune_from!r}, prune_to={self.prune_to!r}")
        if not self.tau > 0 or not (isinstance(self.iters, int) and self.iters >= 1):
            raise MethodError(f"aim: tau must be > 0 and iters an integer >= 1, "
                              f"got tau={self.tau!r}, iters={self.iters!r}")

    def image_features(self, ctx, feats):
        out = []
        for i, f in enumerate(feats):
            merged, rep, slot_of = bipartite_merge(f, keep_count(f.shape[0], self.keep_ratio))
            ctx.record_image_selection(i, rep, merged_into=slot_of)
            out.append(merged.to(f.dtype))
        return out

    def before_layer(self, ctx, layer, tokens):
        if layer == 0:
            return
        n_keep = int(ctx.n_image_tokens * self.retention(layer, ctx.n_layers))
        img = torch.nonzero(tokens.is_image).flatten()
        if img.numel() <= n_keep:
            return
        top = img[pagerank_importance(ctx.attention_logits(layer - 1), self.tau, self.iters)[img].topk(n_keep).indices]
        tokens.keep(torch.cat([torch.nonzero(~tokens.is_image).flatten(), top]))


def visionzip_select(cls_attention: torch.Tensor, keys: torch.Tensor, n_dominant: int, n_contextual: int):
    """VisionZip's choice on one image's patches (official dvlab-research/VisionZip,
    ``visionzip/clip_encoder.py``): the ``n_dominant`` patches of largest [CLS] attention; the rest,
    in sequence order, give ``n_contextual`` targets at the stride ``max(1, rest // n_contextual)``
    and every other remaining patch joins the target of highest cosine similarity of keys.
    ``cls_attention`` (n,), ``keys`` (n, d) of the patches. Returns the kept patches (sorted) and,
    per patch, the slot of the kept patch it is represented by."""
    n = cls_attention.numel()
    dominant = cls_attention.topk(n_dominant).indices
    rest_mask = torch.ones(n, dtype=torch.bool, device=keys.device)
    rest_mask[dominant] = False
    rest = torch.nonzero(rest_mask).flatten()
    step = max(1, rest.numel() // max(1, n_contextual))
    targets = rest[torch.arange(0, rest.numel(), step, device=keys.device)[:n_contextual]]
    kept = torch.cat([dominant, targets]).sort().values
    slot = torch.full((n,), -1, dtype=torch.long, device=keys.device)
    slot[kept] = torch.arange(kept.numel(), device=keys.device)
    others = rest[~torch.isin(rest, targets)]
    if others.numel() and targets.numel():
        normed = F.normalize(keys.float(), dim=-1)
        best = (normed[others] @ normed[targets].T).argmax(-1)  # (others,) index into targets
        slot[others] = slot[targets[best]]
    return kept, slot


@register
@dataclass
class VisionZip(VisualTokenMethod):
    """VisionZip (Yang et al., CVPR 2025): a few dominant tokens carry the image; merge the rest.

    Rule, inside the vision tower's feature layer (before the projector): keep the tokens the
    [CLS] query attends to most (summed over heads) as dominant, split the remaining ones into
    contextual targets at a uniform stride and merge every other token into its most similar
    target (cosine of the layer's keys, mean over heads) by averaging; project both sets. Paper
    default 54 dominant + 10 contextual of 576 = ``keep_ratio`` 64/576, ``contextual_share`` 10/64.
    """

    name: ClassVar[str] = "visionzip"
    keep_ratio: float = 64 / 576
    contextual_share: float = 10 / 64

    def check(self) -> None:
        super().check()
        if not (isinstance(self.contextual_share, (int, float)) and 0 <= self.contextual_share < 1):
            raise MethodError(f"visionzip: contextual_share (the merged tokens' share of the kept ones) must be in "
                              f"[0, 1), got {self.contextual_share!r}")

    def image_features(self, ctx, feats):
        out = []
        for i, f in enumerate(feats):
            n, k = f.shape[0], keep_count(f.shape[0], self.keep_ratio)
            if k >= n:  # keep everything: the features as they are
                out.append(f)
                continue
            vs = ctx.vision_states(i)
            states, cls, keys = vs.states[1:], vs.cls_attention, vs.keys[1:]  # the patches ([CLS] is not projected)
            n_ctx = min(round(k * self.contextual_share), k - 1)
            kept, slot = visionzip_select(cls, keys, k - n_ctx, n_ctx)
            into = slot >= 0  # every patch but the dropped ones (none unless contextual_share is 0)
            merged = torch.zeros(kept.numel(), states.shape[1], dtype=torch.float32, device=states.device)
            merged.index_add_(0, slot[into], states[into].float())
            merged /= torch.bincount(slot[into], minlength=kept.numel()).clamp(min=1)[:, None]
            ctx.record_image_selection(i, kept, merged_into=slot)
            out.append(ctx.project(merged.to(states.dtype)).to(f.dtype))
        return out


def check_depth_fractions(name: str, layers) -> None:
    if not layers or any(not isinstance(f, (int, float)) or not 0 <= f < 1 for f in layers):
        raise MethodError(f"{name}: layers must be fractions of depth in [0, 1), got {layers!r}")


def layers_after(fractions, n_layers: int) -> list[int]:
    """Layers at the given fractions of depth whose *output* a method changes (so never the last one)."""
    return sorted({min(n_layers - 2, round(f * n_layers)) for f in fractions})


# SparseVLM's LLaVA-1.5 schedule (official Gumpest/SparseVLMs, ``llava/model/language_model/score.py``,
# v1.0 lists): visual tokens left after layers 2, 6 and 15 of 32, for an average of 192 / 128 / 64 of 576.
SPARSEVLM_LAYERS = (2 / 32, 6 / 32, 15 / 32)
SPARSEVLM_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


def sparsevlm_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters (Sec. 3.2) from the LLM's input embeddings: softmax over the text tokens of
    visual x text similarity, averaged over the visual tokens; the raters are the text tokens above the
    mean. ``visual`` (v, d), ``text`` (t, d) -> (t,) bool."""
    rel = (visual.float() @ text.float().T).softmax(-1).mean(0)
    return rel > rel.mean()


def dpc_knn_merge(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's recycling clusters (DPC-KNN, official ``cluster_and_merge``): density from the mean
    squared distance to the ``n_clusters`` nearest tokens (distances / sqrt(d)), centres = largest
    density x distance to any denser token, every token to its nearest centre (centres to themselves).
    ``x`` (n, d) -> centres (c,) and the cluster of every token (n,). Ties in density go to the lower
    index (the official code breaks them with 1e-6 noise; with one cluster every density ties)."""
    n = x.shape[0]
    dist = torch.cdist(x.float(), x.float()) / math.sqrt(x.shape[1])
    density = (-dist.topk(n_clusters, dim=-1, largest=False).values.pow(2).mean(-1)).exp()
    idx = torch.arange(n, device=x.device)
    tie = (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    denser = (density[None, :] > density[:, None]) | tie  # (i, j): token j is denser than token i
    parent = torch.where(denser, dist, dist.max()).amin(-1)
    centres = (parent * density).topk(n_clusters).indices
    cluster = dist[centres].argmin(0)
    cluster[centres] = torch.arange(n_clusters, device=x.device)
    return centres, cluster


@register
@dataclass
class SparseVLM(VisualTokenMethod):
    """SparseVLM (Zhang et al., ICML 2025): text-guided visual-token sparsification in the LLM.

    Rule: the text tokens after the image whose embeddings relate most to the visual ones are the
    raters (``sparsevlm_raters``); after each stage layer, visual tokens are ranked by the raters'
    attention in that layer (mean over heads and raters) and the top ones kept. Count per stage: the
    official LLaVA schedule for the budget nearest ``keep_ratio`` x 576 (192 / 128 / 64: 300, 200, 110 /
    303, 110, 36 / 66, 30, 17 of 576 after layers 2, 6, 15 of 32), scaled to ``keep_ratio`` and to the
    model's depth and token count; or, with ``adaptive``, int(rank x ``scale`` + ``bias``) where rank is
    that of the raters x visual attention matrix (the paper's rank-based count). Recycling: the top
    ``recycle_share`` of the dropped tokens (by the same score) are clustered (DPC-KNN) into one per
    ``cluster_size`` and each cluster averaged into its centre token, which stays. ``keep_ratio=1``
    keeps every token.
    """

    name: ClassVar[str] = "sparsevlm"
    keep_ratio: float = 192 / 576
    layers: tuple = SPARSEVLM_LAYERS
    adaptive: bool = False
    scale: float = 13.5
    bias: float = 0.0
    recycle_share: float = 0.3
    cluster_size: int = 10

    def check(self) -> None:
        super().check()
        check_depth_fractions(self.name, self.layers)
        if not (0 <= self.recycle_share <= 1 and isinstance(self.cluster_size, int) and self.cluster_size >= 1):
            raise MethodError(f"sparsevlm: recycle_share must be in [0, 1] and cluster_size an integer >= 1, "
                              f"got {self.recycle_share!r}, {self.cluster_size!r}")

    def stages(self, n_layers: int) -> list[int]:
        """The layers after which tokens are dropped (scored by their own attention)."""
        return layers_after(self.layers, n_layers)

    def counts(self, n_image: int) -> list[float]:
        """Visual tokens left after each stage: the nearest official list, scaled to keep_ratio and n_image."""
        budget = min(SPARSEVLM_COUNTS, key=lambda b: abs(b - self.keep_ratio * 576))
        return [c * self.keep_ratio / budget * n_image for c in SPARSEVLM_COUNTS[budget]]

    def validate(self, ctx) -> None:
        super().validate(ctx)
        if ctx.n_layers < 2:
            raise MethodError(f"sparsevlm prunes after a layer and needs >= 2 layers; {ctx.model_name!r} has "
                              f"{ctx.n_layers}")

    def before_layer(self, ctx, layer, tokens):
        if self.keep_ratio >= 1:  # the schedule's last stage is below its average: 1 is a separate no-op
            return
        if layer == 0:
            img = torch.nonzero(tokens.is_image).flatten()
            text = torch.arange(int(img[-1]) + 1, len(tokens), device=img.device)  # the text after the image
            raters = text[sparsevlm_raters(tokens.hidden[0, img], tokens.hidden[0, text])] if text.numel() else text
            ctx.scratch["sparsevlm_raters"] = tokens.source[raters]
            return
        stages = self.stages(ctx.n_layers)
        if layer - 1 in stages:
            n_keep = self.counts(ctx.n_image_tokens)[min(stages.index(layer - 1), 2)]
            self._prune(ctx, layer - 1, tokens, n_keep)

    def _prune(self, ctx, layer: int, tokens, n_keep: float) -> None:
        img = torch.nonzero(tokens.is_image).flatten()
        raters = torch.nonzero(torch.isin(tokens.source, ctx.scratch["sparsevlm_raters"])).flatten()
        if raters.numel() == 0 or img.numel() == 0:
            return
        rel = ctx.attention(layer, queries=raters).mean(0)[:, img]  # (raters, visual)
        if self.adaptive:
            n_keep = torch.linalg.matrix_rank(rel.float()).item() * self.scale + self.bias
        k = int(n_keep) if self.adaptive else round(n_keep)  # the official int(); a scaled count rounds
        if k >= img.numel():  # keeps every token: the stage does nothing
            return
        score = rel.mean(0)
        order = score.argsort(descending=True, stable=True)
        kept, dropped = img[order[:max(1, k)]], order[max(1, k):]
        into = torch.full((len(tokens),), -1, dtype=torch.long, device=img.device)
        text = torch.nonzero(~tokens.is_image).flatten()
        into[text], into[kept] = text, kept
        if self.recycle_share > 0 and dropped.numel():
            recycled = dropped[:int(dropped.numel() * self.recycle_share) + 1]  # already in score order
            n_clusters = min(recycled.numel(), recycled.numel() // self.cluster_size + 1)
            centres, cluster = dpc_knn_merge(tokens.hidden[0, img[recycled]], n_clusters)
            into[img[recycled]] = img[recycled][centres][cluster]
            kept = torch.cat([kept, img[recycled][centres]])
        tokens.keep(torch.cat([text, kept]), merged_into=into)


# DPN's official schedule (aihao2000/DPN-LLaVA ``hack_llava``): pooling after layers 7, 15, 23 of 32, with the
# experts (kernels) 1, 2, 4 at the first two and 1, 2 at the last
DPN_LAYERS = (7 / 32, 15 / 32, 23 / 32)
DPN_KERNELS = ((1, 2, 4), (1, 2, 4), (1, 2))


def pooling_layers(fractions, n_layers: int) -> list[int]:
    """DPN's pooling layers at ``fractions`` of depth, in order and one per fraction (so never the last one)."""
    return [min(n_layers - 2, round(f * n_layers)) for f in fractions]


def grid_pool_map(rows: int, cols: int, k: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """k x k windows at stride k over a row-major rows x cols grid, as ``F.max_pool2d`` lays them out
    (trailing rows / columns that do not fill a window are dropped). Returns the representative (top-left
    cell) of every window, the window of every cell (-1: dropped) and the pooled grid's shape."""
    h, w = rows // k, cols // k
    r, c = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    window = torch.where((r < h * k) & (c < w * k), (r // k) * w + c // k, -1).flatten()
    rep = ((torch.arange(h)[:, None] * k) * cols + torch.arange(w)[None, :] * k).flatten()
    return rep, window, (h, w)


@register
@dataclass
class DPN(VisualTokenMethod):
    """DPN, Dynamic Pyramid Network (Ai et al., 2025), training-free static variant.

    Rule: after each stage layer, every image's visual-token grid is max-pooled with a ``kernel`` x
    ``kernel`` window at stride ``kernel`` (official ``pooling_function="max"``, ``pooling_location=
    "post"``), so the visual tokens shrink geometrically with depth; an image with fewer than 16 tokens
    left is not pooled. Official layers 7, 15, 23 of 32 (fractions of depth here); kernel 2 takes
    LLaVA's 576 tokens to 144, 36, 9 (192 per layer on average). The trained per-sample pooling experts
    (a router on the last token choosing the kernel) are not part of this class.
    """

    name: ClassVar[str] = "dpn"
    knob: ClassVar[str | None] = None  # the pyramid is set by kernel and layers, not a keep ratio
    layers: tuple = DPN_LAYERS
    kernel: int = 2
    pooling: str = "max"
    min_tokens: int = 16

    def check(self) -> None:
        check_depth_fractions(self.name, self.layers)
        if not (isinstance(self.kernel, int) and self.kernel >= 1) or self.pooling not in ("max", "avg"):
            raise MethodError(f"dpn: kernel must be an integer >= 1 and pooling 'max' or 'avg', "
                              f"got kernel={self.kernel!r}, pooling={self.pooling!r}")

    def stages(self, n_layers: int) -> list[int]:
        """The layers whose output is pooled."""
        return layers_after(self.layers, n_layers)

    def validate(self, ctx) -> None:
        super().validate(ctx)
        if ctx.image_grid is None:
            raise MethodError(f"dpn pools the visual-token grid, and {ctx.model_name!r} has none "
                              f"(e.g. LLaVA-NeXT tiles with newline tokens); use sparsevlm or fastv")

    def before_layer(self, ctx, layer, tokens):
        if layer == 0:
            ctx.scratch["dpn_grid"] = ctx.image_grid
        if layer - 1 not in self.stages(ctx.n_layers) or self.kernel == 1:
            return
        if dpn_grid_size(ctx, tokens, self.name) >= self.min_tokens:
            pool_grids(ctx, tokens, self.kernel, self.pooling)


def dpn_grid_size(ctx, tokens, name: str) -> int:
    """Tokens in each image's current grid (``ctx.scratch["dpn_grid"]``); refuses a run whose visual tokens
    no longer form whole grids."""
    rows, cols = ctx.scratch["dpn_grid"]
    n_img = int(tokens.is_image.sum())
    if n_img % (rows * cols):
        raise MethodError(f"{name}: {n_img} visual tokens do not form whole {rows}x{cols} grids; combine it "
                          f"only with methods that keep every image's grid (e.g. pool, or none before it)")
    return rows * cols


def pool_grids(ctx, tokens, kernel: int, pooling: str) -> None:
    """Pool every image's row-major grid of live visual tokens with ``kernel`` x ``kernel`` windows at stride
    ``kernel`` (``F.max_pool2d`` / ``avg_pool2d`` layout; a grid narrower than the kernel is left alone);
    updates ``ctx.scratch["dpn_grid"]``. Text passes untouched."""
    rows, cols = ctx.scratch["dpn_grid"]
    if kernel == 1 or min(rows, cols) < kernel:
        return
    img = torch.nonzero(tokens.is_image).flatten()
    rep, window, ctx.scratch["dpn_grid"] = grid_pool_map(rows, cols, kernel)
    into = torch.full((len(tokens),), -1, dtype=torch.long, device=img.device)
    text = torch.nonzero(~tokens.is_image).flatten()
    into[text], kept = text, [text]
    for block in img.view(-1, rows * cols):  # one image's grid, row-major
        cell = window.to(block.device)
        into[block[cell >= 0]] = block[rep.to(block.device)][cell[cell >= 0]]
        kept.append(block[rep.to(block.device)])
    tokens.keep(torch.cat(kept), merged_into=into, reduce="amax" if pooling == "max" else "mean")


class PoolingRouter(torch.nn.Module):
    """DPN's router (official aihao2000/DPN-LLaVA ``PoolingRouter``, v1): LayerNorm -> Linear(d, d/4, no bias)
    -> GELU -> Linear(d/4, experts, no bias) (Kaiming-uniform, torch's default); one per pooling layer."""

    def __init__(self, d: int, n_experts: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, d // 4, bias=False),
                                       torch.nn.GELU(), torch.nn.Linear(d // 4, n_experts, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) router-token hidden states -> (..., experts) expert probabilities: softmax(logits / 10)."""
        return torch.softmax(self.mlp(x).float() / 10, -1)


class PoolingRouters(torch.nn.Module):
    """The routers of DPN's pooling layers, with the schedule they were trained for: ``layers`` (fractions of
    depth) and ``kernels`` (each layer's experts, kernel 1 = no pooling)."""

    def __init__(self, d: int, layers: tuple, kernels: tuple):
        super().__init__()
        self.dims = {"d": d, "layers": list(layers), "kernels": [list(k) for k in kernels]}
        self.layers, self.kernels = tuple(layers), tuple(tuple(k) for k in kernels)
        self.routers = torch.nn.ModuleList(PoolingRouter(d, len(k)) for k in kernels)


@register
@dataclass
class DPNExperts(VisualTokenMethod):
    """DPN's dynamic pooling experts (Ai et al., 2025): a trained router per pooling layer picks the kernel.

    Rule (official ``pooling_type="adaptive"``, inference): after each pooling layer a router on the last
    prompt token's hidden state gives p = softmax(logits / 10) over its experts; the argmax expert's kernel
    max-pools every image's grid (kernel 1: no pooling) and the visual tokens are multiplied by that p; a
    grid of fewer than 16 tokens is left alone. ``routing="random"``: a uniform expert per layer (seeded);
    with ``scale=False`` that is the official ``pooling_type="random"``, with ``scale=True`` (our control) the
    drawn expert's router probability still scales, so only the choice differs. The routers ship with
    ``tiny-llava-dpn`` (``mmlab train-tiny --dpn``); ``layers=()`` pools nothing.
    """

    name: ClassVar[str] = "dpn_experts"
    knob: ClassVar[str | None] = None
    requires: ClassVar[dict] = {"dpn": ("trained pooling routers", "load tiny-llava-dpn (it ships them) or train "
                                        "them: mmlab train-tiny --dpn")}
    layers: tuple = DPN_LAYERS
    kernels: tuple = DPN_KERNELS
    pooling: str = "max"
    min_tokens: int = 16
    routing: str = "router"
    scale: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.layers:
            check_depth_fractions(self.name, self.layers)
        if (len(self.kernels) != len(self.layers) and self.layers) or not all(
                k and all(isinstance(x, int) and x >= 1 for x in k) for k in self.kernels):
            raise MethodError(f"dpn_experts: kernels must give each pooling layer its experts (integers >= 1), "
                              f"got kernels={self.kernels!r} for layers={self.layers!r}")
        if self.pooling not in ("max", "avg") or self.routing not in ("router", "random") or not isinstance(
                self.scale, bool):
            raise MethodError(f"dpn_experts: pooling must be 'max' or 'avg', routing 'router' or 'random' and scale "
                              f"True or False, got pooling={self.pooling!r}, routing={self.routing!r}, "
                              f"scale={self.scale!r}")

    def keeps_everything(self) -> bool:
        return not self.layers

    def uses_extras(self) -> bool:
        return bool(self.layers) and (self.routing == "router" or self.scale)

    def validate(self, ctx) -> None:
        super().validate(ctx)
        if ctx.image_grid is None:
            raise MethodError(f"dpn_experts pools the visual-token grid, and {ctx.model_name!r} has none")
        if len(set(self.stages(ctx.n_layers))) != len(self.layers):
            raise MethodError(f"dpn_experts: layers {self.layers!r} fall on fewer distinct layers of "
                              f"{ctx.model_name!r}'s {ctx.n_layers}")
        r = ctx.extras.get("dpn") if self.uses_extras() else None
        if r is not None and (tuple(self.layers), tuple(map(tuple, self.kernels))) != (r.layers, r.kernels):
            raise MethodError(f"dpn_experts: {ctx.model_name!r}'s routers were trained for layers={r.layers} and "
                              f"kernels={r.kernels}; got layers={self.layers!r}, kernels={self.kernels!r}")

    def stages(self, n_layers: int) -> list[int]:
        """The layers whose output is pooled, in order (one router each)."""
        return pooling_layers(self.layers, n_layers)

    def before_layer(self, ctx, layer, tokens):
        if layer == 0:
            ctx.scratch["dpn_grid"] = ctx.image_grid
            ctx.trace.extra["dpn_kernels"] = []
        stages = self.stages(ctx.n_layers)
        if layer - 1 not in stages or dpn_grid_size(ctx, tokens, self.name) < self.min_tokens:
            return
        i = stages.index(layer - 1)
        expert, p = self.choose(ctx, i, tokens.hidden[0, -1])
        pool_grids(ctx, tokens, self.kernels[i][expert], self.pooling)
        if p is not None:  # the chosen expert's probability scales the visual tokens (the router's gradient path)
            scale = torch.where(tokens.is_image, p.to(tokens.hidden.dtype), torch.ones((), dtype=tokens.hidden.dtype))
            tokens.hidden = tokens.hidden * scale[None, :, None]
        ctx.trace.extra["dpn_kernels"].append((layer - 1, self.kernels[i][expert]))

    def choose(self, ctx, i: int, router_token: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Stage ``i``'s expert and the probability that scales the visual tokens (None: no scaling)."""
        if self.routing == "random":
            gen = torch.Generator().manual_seed(self.seed * 1009 + ctx.sample_index * 31 + i)
            expert = int(torch.randint(len(self.kernels[i]), (1,), generator=gen))
        if not self.uses_extras():
            return expert, None
        router = ctx.extras["dpn"].routers[i]
        probs = router(router_token.to(next(router.parameters()).dtype))
        if self.routing == "router":
            expert = int(probs.argmax())
        return expert, probs[expert] if self.scale else None


# YOPO's LLaVA-1.5-13B setting (official zhaowt61/YOPO_MLLM_Pruning_fork, ``finetune_yopo.sh`` and
# ``modeling_llama_prune.py``): attncut_w 5, layercut_num 20 of 40 layers, headcut_num 30 of 40 heads
# per layer on average (its shipped masks keep every head of layers 0 and 1).
def neighbour_mask(rows: int, cols: int, window: int) -> torch.Tensor:
    """(rows*cols, rows*cols) bool over a row-major grid: True where two cells lie within each other's
    ``window`` x ``window`` neighbourhood (|d row| and |d col| <= (window - 1) // 2), in both directions."""
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    half = (window - 1) // 2
    return ((r[:, None] - r[None, :]).abs() <= half) & ((c[:, None] - c[None, :]).abs() <= half)


def yopo_heads(activity: torch.Tensor, keep: float, full_layers: int) -> torch.Tensor:
    """(layers, heads) bool: the heads that still see visual tokens. Every head of the first
    ``full_layers`` layers, then the most image-reading heads of the other layers, chosen across layers,
    up to ``keep`` of all heads in total (ties: the earlier layer, then the lower head)."""
    n_layers, n_heads = activity.shape
    full = min(full_layers, n_layers)
    kept = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    kept[:full] = True
    rest = activity[full:].flatten().float()
    k = max(0, min(rest.numel(), round(keep * n_layers * n_heads) - full * n_heads))
    kept[full:].view(-1)[torch.argsort(-rest, stable=True)[:k]] = True  # stable: ties keep the lower index
    return kept


def token_images(ctx, tokens) -> torch.Tensor:
    """(n,): the image each live token belongs to (-1: text)."""
    return ctx.trace.modality.to(tokens.source.device)[tokens.source]


def grid_cells(ctx, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, cell) of every live token: the image it belongs to (-1: text) and its row-major cell in that
    image's token grid (0 for text). Source indices count every image's full grid (``Trace``), so a
    token's cell is its offset from its image's first source index, whatever was removed."""
    modality = ctx.trace.modality.to(tokens.source.device)
    image = token_images(ctx, tokens)
    cell = torch.zeros_like(tokens.source)
    for k in image[tokens.is_image].unique().tolist():
        mine = image == k
        cell[mine] = tokens.source[mine] - int(torch.nonzero(modality == k)[0])
    return image, cell


@register
@dataclass
class YOPO(VisualTokenMethod):
    """YOPO: "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See" (Zhang et al.,
    2024), its three training-free cuts of visual computation.

    Rule: (1) a visual token attends to visual tokens only inside its ``window`` x ``window`` grid
    neighbourhood (both directions, as the official local mask; text rows stay causal); (2) in each layer
    only the heads that read the image most (``mmlab.visual_heads`` on a calibration set, ``head_keep`` of
    all heads, every head of the first ``full_head_layers``) see visual tokens: elsewhere no query
    attends to them and their own output of that head is cut; (3) from ``layer_cut`` of depth on, the
    visual tokens are gone. None / 1.0 turns a cut off. Cuts 1-2 are masks (counted by
    ``Trace.restricted`` for ``prefill_sparse`` FLOPs); cut 3 removes the tokens.
    """

    name: ClassVar[str] = "yopo"
    knob: ClassVar[str | None] = None  # three cuts, each with its own setting
    window: int | None = 5
    head_keep: float = 0.75
    layer_cut: float = 0.5
    full_head_layers: int = 2

    def check(self) -> None:
        if self.window is not None and not (isinstance(self.window, int) and self.window >= 1 and self.window % 2):
            raise MethodError(f"yopo: window must be an odd integer >= 1 (5 in the paper) or None (no "
                              f"neighbourhood cut), got {self.window!r}")
        check_ratio(self.name, self.head_keep, "head_keep")
        check_ratio(self.name, self.layer_cut, "layer_cut")
        if not (isinstance(self.full_head_layers, int) and self.full_head_layers >= 0):
            raise MethodError(f"yopo: full_head_layers must be an integer >= 0, got {self.full_head_layers!r}")

    def cut_layer(self, n_layers: int) -> int | None:
        """The first layer without visual tokens (None: they stay to the end)."""
        return None if self.layer_cut >= 1 else max(1, round(self.layer_cut * n_layers))

    def validate(self, ctx) -> None:
        super().validate(ctx)
        if self.window is not None and ctx.image_grid is None:
            raise MethodError(f"yopo's neighbourhood cut needs a 2-D visual-token grid, and {ctx.model_name!r} "
                              f"has none; use window=None")
        heads = (ctx.n_layers, ctx.config.num_attention_heads)
        if self.head_keep < 1 and tuple(getattr(ctx.extras.get("visual_heads"), "shape", ())) != heads:
            raise MethodError(f"yopo's head cut ranks heads by how much they read the image, and "
                              f"{ctx.model_name!r} has no such calibration of its {heads[0]}x{heads[1]} heads: "
                              f"call mmlab.visual_heads(bundle, calibration_samples) first, or use head_keep=1.0")

    def before_layer(self, ctx, layer, tokens):
        cut = self.cut_layer(ctx.n_layers)
        if layer == cut and tokens.is_image.any():
            tokens.keep(torch.nonzero(~tokens.is_image).flatten())
        if (cut is not None and layer >= cut) or not tokens.is_image.any():
            return
        if layer == 0 and self.head_keep < 1:
            ctx.scratch["yopo_heads"] = yopo_heads(ctx.extras["visual_heads"], self.head_keep, self.full_head_layers)
            ctx.trace.extra["yopo_heads"] = ctx.scratch["yopo_heads"]
        cut_heads = ~ctx.scratch["yopo_heads"][layer] if self.head_keep < 1 else None
        if self.window is None and (cut_heads is None or not cut_heads.any()):
            return
        if ctx.scratch.get("yopo_source") is not tokens.source:  # rebuilt only when the live tokens change
            ctx.scratch["yopo_source"], ctx.scratch["yopo_allowed"] = tokens.source, self._neighbours(ctx, tokens)
        allowed = ctx.scratch["yopo_allowed"][None]
        gate = None
        if cut_heads is not None and cut_heads.any():
            allowed, gate = self._cut_heads(allowed, tokens.is_image, cut_heads.to(allowed.device))
        tokens.restrict(allowed, gate)

    def _neighbours(self, ctx, tokens) -> torch.Tensor:
        """(n, n): causal, with visual-to-visual pairs allowed only within one image's neighbourhood, by
        each token's cell in its image's grid (tokens another method removed leave holes)."""
        n, dev = len(tokens), tokens.hidden.device
        allowed = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        if self.window is None:
            return allowed
        image, cell = grid_cells(ctx, tokens)
        local = neighbour_mask(*ctx.image_grid, self.window).to(dev)  # (cells, cells)
        near = local[cell[:, None], cell[None, :]] & (image[:, None] == image[None, :])
        both = tokens.is_image[:, None] & tokens.is_image[None, :]
        return torch.where(both, near, allowed)

    @staticmethod
    def _cut_heads(allowed, is_image, cut):
        """In the cut heads no query sees a visual key (a visual query keeps itself, whose output is cut)."""
        heads = cut.numel()
        allowed = allowed.expand(heads, -1, -1).clone()
        blind = allowed[cut]  # (cut heads, n, n)
        blind[:, :, is_image] = False
        img = torch.nonzero(is_image).flatten()
        blind[:, img, img] = True
        allowed[cut] = blind
        gate = torch.ones(len(is_image), heads, device=allowed.device)
        gate[is_image[:, None] & cut[None, :]] = 0
        return allowed, gate


class VisionPredictor(torch.nn.Module):
    """Dynamic-LLaVA's image predictor (official Osilly/dynamic_llava, ``VisionPredictor``): LayerNorm ->
    Linear(d, d_model) -> GELU, two pre-norm transformer blocks, each token's first half of features beside
    the image's mean second half (local / global), then an MLP to 2 logits (keep, drop) per visual token.
    LLaVA-7B: d 4096, d_model 512, 8 heads, feed-forward 2048; the embedded models scale d_model to width."""

    def __init__(self, d: int, d_model: int = 512, heads: int = 8, ff: int = 2048, blocks: int = 2):
        super().__init__()
        self.dims = {"d": d, "d_model": d_model, "heads": heads, "ff": ff, "blocks": blocks}
        self.down = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, d_model), torch.nn.GELU())
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True) for _ in range(blocks))
        self.out = torch.nn.Sequential(torch.nn.Linear(d_model, d_model // 2), torch.nn.GELU(),
                                       torch.nn.Linear(d_model // 2, d_model // 4), torch.nn.GELU(),
                                       torch.nn.Linear(d_model // 4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_img, d) visual hidden states -> (B, n_img, 2) logits (column 0: keep)."""
        h = self.down(x)
        for block in self.blocks:
            h = block(h)
        half = h.shape[-1] // 2
        glob = h[..., half:].mean(1, keepdim=True).expand(-1, h.shape[1], -1)
        return self.out(torch.cat([h[..., :half], glob], -1))


@register
@dataclass
class DynamicLLaVA(VisualTokenMethod):
    """Dynamic-LLaVA (Huang et al., ICLR 2025), its prefill half: a learned predictor prunes the image.

    Rule: before layer ``layer`` (2 of 32 in the paper, a fraction of depth here) a trained
    ``VisionPredictor`` scores every visual token of each image from its hidden state; the top
    ``keep_ratio`` by the keep log-probability stay (official ``vision_keep_rate`` 0.2), the rest are
    removed from that layer on. The predictor ships with the checkpoint (``mmlab train-tiny --dynamic``).
    """

    name: ClassVar[str] = "dynamic_llava"
    requires: ClassVar[dict] = {"dynamic_llava": ("a trained vision predictor", "use tiny-llava-deep (it ships "
                                                  "one) or train one: mmlab train-tiny --dynamic --model NAME")}
    keep_ratio: float = 0.2
    layer: float = 2 / 32

    def check(self) -> None:
        super().check()
        check_depth_fractions(self.name, [self.layer])

    def keeps_everything(self) -> bool:
        return self.keep_ratio >= 1

    def before_layer(self, ctx, layer, tokens):
        if layer != round(self.layer * ctx.n_layers) or self.keep_ratio >= 1:
            return
        predictor = ctx.extras["dynamic_llava"]
        image = token_images(ctx, tokens)
        kept = [torch.nonzero(image < 0).flatten()]
        for k in image[tokens.is_image].unique():
            idx = torch.nonzero(image == k).flatten()
            x = tokens.hidden[:, idx].to(next(predictor.parameters()).dtype)
            score = torch.log_softmax(predictor(x).float(), -1)[0, :, 0]
            n_keep = max(1, int(idx.numel() * self.keep_ratio))  # official: int(init_image_n * vision_keep_rate)
            kept.append(idx[score.topk(n_keep).indices])
        tokens.keep(torch.cat(kept).sort().values)
