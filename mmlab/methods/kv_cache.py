"""KV-cache eviction and merging: StreamingLLM, H2O, SnapKV, LOOK-M, KVMerger after the prefill;
Dynamic-LLaVA's decode half while decoding (the last section).

The prompt methods act at ``after_prefill``: for each layer they choose which of the
prompt's cached key/value pairs to keep (and, for the merging methods, fold evicted
pairs into kept ones), and replace the layer's tensors with smaller ones, so the
bytes really shrink. Kept keys carry the RoPE rotation of their original position and
decoding continues at the uncompressed prompt length, as in the papers' code.

``budget``: a fraction of each layer's prompt KV in (0, 1] (floored, as kvpress does) or
an int token count. Selection is per KV head where the paper scores per head (H2O,
SnapKV, LOOK-M; with grouped-query attention the query heads of a group are pooled),
per layer otherwise (StreamingLLM, KVMerger). Attention scores are recomputed only for
what a method needs (``ctx.attention``); the model stays on SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmlab.methods.base import Method, MethodError, budget_tokens, check_budget, register


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` (1, heads, n, d) restricted to ``idx`` (heads, k) along the sequence, per head."""
    return t[0].gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))[None].contiguous()


def kv_head_scores(probs: torch.Tensor, kv_heads: int, reduce: str = "sum") -> torch.Tensor:
    """(query heads, ..., n) -> (kv heads, ..., n): pool the query heads that share a KV head."""
    g = probs.shape[0] // kv_heads
    x = probs.reshape(kv_heads, g, *probs.shape[1:])
    return x.sum(1) if reduce == "sum" else x.mean(1)


def accumulated_attention(ctx, layer: int, kv_heads: int) -> torch.Tensor:
    """H2O's score: attention each cached token received, summed over every prompt query (kv heads, n)."""
    return kv_head_scores(ctx.attention_received(layer), kv_heads)


def top_with_window(scores: torch.Tensor, n_keep: int, window: int) -> torch.Tensor:
    """Per head: the last ``window`` tokens plus the top ``n_keep - window`` of the rest, sorted (heads, n_keep)."""
    n = scores.shape[-1]
    top = scores[:, : n - window].topk(n_keep - window, dim=-1).indices
    recent = torch.arange(n - window, n, device=scores.device).expand(scores.shape[0], -1)
    return torch.cat([top, recent], dim=-1).sort(dim=-1).values


@dataclass
class KVMethod(Method):
    """Shared loop of the family: per layer, ``compress`` returns the kept keys, values and indices."""

    family: ClassVar[str] = "kv_cache"
    knob: ClassVar[str] = "budget"
    prefill_attention: ClassVar[bool] = True
    budget: float | int = 0.5

    def check(self) -> None:
        check_budget(self.name, self.budget)
        super().check()

    def protected(self, n_keep: int) -> int:
        """Tokens the rule always keeps (sinks, observation window); must fit in the budget."""
        return 0

    def after_prefill(self, ctx, cache):
        kept_record = {}
        for layer in range(ctx.n_layers):
            keys, values = cache.keys[layer], cache.values[layer]
            n = keys.shape[-2]
            n_keep = budget_tokens(self.budget, n)
            if n_keep >= n:
                continue
            if self.protected(n_keep) > n_keep:
                raise MethodError(f"{self.name}: a budget of {n_keep} tokens ({self.budget!r} of {n}) is smaller than "
                                  f"the {self.protected(n_keep)} tokens the rule always keeps; raise the budget or "
                                  f"shrink the window")
            cache.keys[layer], cache.values[layer], idx = self.compress(ctx, layer, keys, values, n_keep)
            kept_record[layer] = idx.cpu()
        ctx.trace.extra.setdefault("kv_kept", {}).update(kept_record)

    def compress(self, ctx, layer, keys, values, n_keep):
        raise NotImplementedError


@dataclass
class HeavyHitterKV(KVMethod):
    """H2O's keep set, shared by LOOK-M and KVMerger: per KV head, the ``recent_ratio`` share of the
    budget as the most recent tokens, the rest by attention accumulated over all prompt queries."""

    recent_ratio: float = 0.5

    def check(self) -> None:
        r = self.recent_ratio
        if not (isinstance(r, (int, float)) and 0 <= r < 1):
            raise MethodError(f"{self.name}: recent_ratio must be in [0, 1) (share of the budget for the most "
                              f"recent tokens), got {r!r}")
        super().check()

    def scores(self, ctx, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """(kv heads, n): the attention each cached token received, summed over the prompt's queries."""
        return accumulated_attention(ctx, layer, keys.shape[1])

    def keep_set(self, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
        return top_with_window(scores, n_keep, int(n_keep * self.recent_ratio))


@register
@dataclass
class StreamingLLM(KVMethod):
    """StreamingLLM (Xiao et al., ICLR 2024): attention sinks + a recent window.

    Rule: keep the first ``sinks`` tokens and the most recent ``budget - sinks``; drop the middle.
    """

    name = "streamingllm"
    prefill_attention = False
    sinks: int = 4

    def protected(self, n_keep):
        return self.sinks

    def compress(self, ctx, layer, keys, values, n_keep):
        n = keys.shape[-2]
        idx = torch.cat([torch.arange(self.sinks), torch.arange(n - (n_keep - self.sinks), n)]).to(keys.device)
        idx = idx.expand(keys.shape[1], -1)
        return gather_tokens(keys, idx), gather_tokens(values, idx), idx


@register
@dataclass
class H2O(HeavyHitterKV):
    """H2O (Zhang et al., NeurIPS 2023): heavy hitters + recent tokens.

    Rule: per KV head, keep the ``recent_ratio`` share of the budget as the most recent tokens and
    fill the rest with the tokens of largest attention accumulated over all prompt queries.
    """

    name = "h2o"

    def compress(self, ctx, layer, keys, values, n_keep):
        idx = self.keep_set(self.scores(ctx, layer, keys), n_keep)
        return gather_tokens(keys, idx), gather_tokens(values, idx), idx


@register
@dataclass
class SnapKV(KVMethod):
    """SnapKV (Li et al., NeurIPS 2024): the last queries already know what matters.

    Rule: per KV head, score each earlier token by the attention of the last ``window`` prompt
    queries (mean over them, average-pooled with ``kernel``, mean over grouped query heads);
    keep the window plus the top ``budget - window``.
    """

    name = "snapkv"
    window: int = 64
    kernel: int = 5

    def check(self) -> None:
        if not (isinstance(self.window, int) and self.window >= 1 and isinstance(self.kernel, int)
                and self.kernel >= 1 and self.kernel % 2 == 1):
            raise MethodError(f"snapkv: window must be an int >= 1 and kernel an odd int >= 1, "
                              f"got window={self.window!r}, kernel={self.kernel!r}")
        if isinstance(self.budget, int) and self.budget < self.window:
            raise MethodError(f"snapkv: a budget of {self.budget} tokens is smaller than the observation window "
                              f"of {self.window} it always keeps")
        super().check()

    def protected(self, n_keep):
        return self.window

    def compress(self, ctx, layer, keys, values, n_keep):
        n, w = keys.shape[-2], self.window
        if n <= w:
            raise MethodError(f"snapkv: the prompt ({n} tokens) must be longer than the window ({w})")
        probs = ctx.attention(layer, queries=slice(n - w, n))[..., : n - w]  # (heads, w, n - w)
        scores = F.avg_pool1d(probs.mean(1)[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
        scores = kv_head_scores(scores, keys.shape[1], "mean")
        scores = torch.cat([scores, scores.new_full((scores.shape[0], w), float("inf"))], dim=-1)
        idx = top_with_window(scores, n_keep, w)
        return gather_tokens(keys, idx), gather_tokens(values, idx), idx


MERGES = ("none", "average", "pivotal", "weighted")


def merge_into_kept(keys, values, kept, merge: str):
    """LOOK-M's merging: every evicted pair joins its most cosine-similar kept key (per head).

    average:  k_c <- (k_c + sum k_e) / (1 + n_c)
    pivotal:  each evicted key is first averaged with its pivot, then as average
    weighted: only evictions whose similarity is above the mean, scaled by it:
              (k_c + sum s_e k_e) / (1 + n_c); one filter shared by the heads, as the official code
              (SUSTechBruce/LOOK-M, kv_token_merge/modify_llama.py): the j-th eviction of every head
              joins when its similarity averaged over heads is >= the mean over all heads and evictions
    Values follow their keys' assignments and weights. Returns the merged (1, h, k, d) tensors and,
    per head and cache position, the position of the kept token it merged into (-1: none; (h, n)).
    """
    h, n, d = keys.shape[1], keys.shape[2], keys.shape[3]
    k_kept, v_kept = gather_tokens(keys, kept)[0], gather_tokens(values, kept)[0]  # (h, k, d)
    into = torch.full((h, n), -1, dtype=torch.long, device=keys.device)
    if merge == "none":
        return k_kept[None], v_kept[None], into
    evict_mask = torch.ones(h, n, dtype=torch.bool, device=keys.device).scatter_(1, kept, False)
    ev = evict_mask.nonzero()[:, 1].view(h, -1)  # every head evicts the same number of tokens
    k_ev, v_ev = gather_tokens(keys, ev)[0], gather_tokens(values, ev)[0]  # (h, e, d)
    sim = F.normalize(k_ev.float(), dim=-1) @ F.normalize(k_kept.float(), dim=-1).transpose(1, 2)
    best, target = sim.max(-1)  # (h, e)
    weight = torch.ones_like(best)
    if merge == "pivotal":
        k_src = (k_ev + k_kept.gather(1, target[..., None].expand(-1, -1, d))) / 2
        v_src = (v_ev + v_kept.gather(1, target[..., None].expand(-1, -1, d))) / 2
    else:
        k_src, v_src = k_ev, v_ev
        if merge == "weighted":
            shared = best.mean(0, keepdim=True) >= best.mean()  # (1, e): max_values.mean(1) >= max_values.mean()
            weight = torch.where(shared, best, torch.zeros_like(best))
            k_src, v_src = k_src * weight[..., None], v_src * weight[..., None]
    joins = (weight > 0).to(k_kept.dtype)  # evictions that take part (all but filtered-out weighted ones)
    idx = target[..., None].expand(-1, -1, d)
    count = torch.ones(h, k_kept.shape[1], device=keys.device, dtype=k_kept.dtype).scatter_add_(1, target, joins)
    k_new = k_kept.scatter_add(1, idx, k_src.to(k_kept.dtype)) / count[..., None]
    v_new = v_kept.scatter_add(1, idx, v_src.to(v_kept.dtype)) / count[..., None]
    into.scatter_(1, ev, torch.where(joins > 0, kept.gather(1, target), -1))
    return k_new[None], v_new[None], into


@register
@dataclass
class LookM(HeavyHitterKV):
    """LOOK-M (Wan et al., EMNLP Findings 2024): look-once KV optimisation for multimodal long context.

    Rule: text-prior eviction: the recent window (``recent_ratio`` of the budget) and the text
    tokens are kept first, image tokens compete for the rest by accumulated attention (per KV
    head); each evicted pair is then merged into its most cosine-similar kept key by ``merge``
    (none | average | pivotal | weighted). Paper setting: 10% heavy hitters + 10% recent.
    ``keep_all_text``: as the official code, no non-recent text token is ever evicted (text ranks
    first, and every text token is kept even past the heavy-hitter share), so the cache can exceed
    the budget when text outnumbers it; the default (False) always holds the budget.
    """

    name = "lookm"
    budget: float | int = 0.2
    merge: str = "average"
    text_prior: bool = True
    keep_all_text: bool = False

    def check(self) -> None:
        if self.merge not in MERGES:
            raise MethodError(f"lookm: merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        if self.keep_all_text and not self.text_prior:
            raise MethodError("lookm: keep_all_text (the official text prior) needs text_prior=True")
        super().check()

    def compress(self, ctx, layer, keys, values, n_keep):
        scores = self.scores(ctx, layer, keys)
        if self.text_prior:  # text outranks every image token; images compete among themselves
            scores = scores - ctx.cache_is_image(layer).to(scores.dtype) * (scores.max() + 1)
        kept = self.keep_set(scores, n_keep)
        if self.keep_all_text:  # official: every text token stays (the keep set may outgrow the budget)
            mask = torch.zeros(scores.shape, dtype=torch.bool, device=kept.device).scatter_(1, kept, True)
            mask |= ~ctx.cache_is_image(layer).to(kept.device)[None, :]
            kept = mask.nonzero()[:, 1].view(mask.shape[0], -1)  # text is the same for every head
        k, v, into = merge_into_kept(keys, values, kept, self.merge)
        ctx.trace.extra.setdefault("kv_merged_into", {})[layer] = into.cpu()
        return k, v, kept


def adjacent_key_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each key with the previous token's key, per head: (heads, n, d) -> (heads, n - 1)."""
    return F.cosine_similarity(keys[:, 1:].float(), keys[:, :-1].float(), dim=-1)


def merging_sets(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """KVMerger's merging sets: maximal runs of adjacent tokens whose consecutive keys have cosine
    similarity > ``threshold``. ``keys`` (heads, n, d); returns each token's set id per head (heads, n)."""
    sim = adjacent_key_similarity(keys)
    starts = torch.cat([torch.ones_like(sim[:, :1], dtype=torch.long), (sim <= threshold).long()], dim=1)
    return starts.cumsum(1) - 1


def gaussian_merge(k: torch.Tensor, v: torch.Tensor, score: torch.Tensor, kept: torch.Tensor, sets: torch.Tensor):
    """One head: fold each set's evicted states into the set's most attended kept state (the pivot)
    with weights exp(-||k_i - k_p||^2 / (2 sigma^2)), sigma^2 = the set's mean squared distance to
    the pivot (the pivot weighs 1). ``k``, ``v`` (n, d) float; returns them and, per position, the
    pivot it merged into (-1: kept, or evicted without a pivot)."""
    n = k.shape[0]
    is_kept = torch.zeros(n, dtype=torch.bool, device=k.device)
    is_kept[kept] = True
    s = torch.where(is_kept, score, torch.full_like(score, -float("inf")))
    n_sets = int(sets.max()) + 1
    best = torch.full((n_sets,), -float("inf"), device=k.device).scatter_reduce(0, sets, s, "amax")
    is_pivot = is_kept & (s == best[sets])
    pivot_of_set = torch.full((n_sets,), -1, dtype=torch.long, device=k.device)
    pivot_of_set[sets[is_pivot]] = torch.nonzero(is_pivot).flatten()
    pivot = pivot_of_set[sets]  # -1: the set kept nothing, its states are simply evicted
    merging = ~is_kept & (pivot >= 0)
    into = torch.where(merging, pivot, -1)
    if not merging.any():
        return k, v, into
    src, dst = torch.nonzero(merging).flatten(), pivot[merging]
    d2 = (k[src] - k[dst]).pow(2).sum(-1)
    cnt = torch.zeros(n, device=k.device).index_add_(0, dst, torch.ones_like(d2))
    sigma2 = (torch.zeros(n, device=k.device).index_add_(0, dst, d2) / cnt.clamp(min=1)).clamp(min=1e-12)
    w = torch.exp(-d2 / (2 * sigma2[dst]))
    wsum = torch.ones(n, device=k.device).index_add_(0, dst, w)
    k = k.index_add(0, dst, k[src] * w[:, None]) / wsum[:, None]
    v = v.index_add(0, dst, v[src] * w[:, None]) / wsum[:, None]
    return k, v, into


@register
@dataclass
class KVMerger(HeavyHitterKV):
    """KVMerger (Wang et al., 2024): adaptive KV merging from adjacent-key similarity.

    Rule: per KV head, merging sets are runs of adjacent tokens whose keys have cosine
    similarity > ``threshold``; the budget keeps the recent window (``recent_ratio``) plus the
    most attended tokens (accumulated attention, as H2O); each set's most attended kept token
    is its pivot and the set's evicted states are merged into it with Gaussian-kernel weights
    (``gaussian_merge``). Paper budgets: 50% and 35%.
    """

    name = "kvmerger"
    threshold: float = 0.75

    def check(self) -> None:
        if not -1 <= self.threshold <= 1:
            raise MethodError(f"kvmerger: threshold is a cosine similarity in [-1, 1], got {self.threshold!r}")
        super().check()

    def compress(self, ctx, layer, keys, values, n_keep):
        scores = self.scores(ctx, layer, keys)
        kept = self.keep_set(scores, n_keep)
        sets = merging_sets(keys[0], self.threshold)
        k, v = keys[0].float().clone(), values[0].float().clone()
        into = torch.full(scores.shape, -1, dtype=torch.long)
        for h in range(keys.shape[1]):
            k[h], v[h], into[h] = gaussian_merge(k[h], v[h], scores[h], kept[h], sets[h])
        ctx.trace.extra.setdefault("kv_merged", {})[layer] = int((into >= 0).sum())
        ctx.trace.extra.setdefault("kv_merged_into", {})[layer] = into
        return gather_tokens(k[None].to(keys.dtype), kept), gather_tokens(v[None].to(values.dtype), kept), kept


# --- decode-time eviction -------------------------------------------------------------------------
class TextPredictor(torch.nn.Module):
    """Dynamic-LLaVA's output-text predictor (official Osilly/dynamic_llava, ``TextPredictor``): LayerNorm ->
    Linear(d, d_model) -> GELU -> Linear(d_model / 2) -> GELU -> Linear(d_model / 4) -> GELU -> 2 logits
    (keep, drop) per token. LLaVA-7B: d 4096, d_model 512."""

    def __init__(self, d: int, d_model: int = 512):
        super().__init__()
        self.dims = {"d": d, "d_model": d_model}
        self.mlp = torch.nn.Sequential(
            torch.nn.LayerNorm(d), torch.nn.Linear(d, d_model), torch.nn.GELU(),
            torch.nn.Linear(d_model, d_model // 2), torch.nn.GELU(),
            torch.nn.Linear(d_model // 2, d_model // 4), torch.nn.GELU(), torch.nn.Linear(d_model // 4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) hidden states -> (..., 2) logits (column 0: keep)."""
        return self.mlp(x)


@register
@dataclass
class DynamicLLaVADecode(Method):
    """Dynamic-LLaVA (Huang et al., ICLR 2025), its decode half: a learned predictor thins generated tokens' KV.

    Rule (official inference with the KV cache): each generated token's hidden state entering layer
    ``layer`` (sparse_layer 2 of 32) goes through a trained ``TextPredictor``; it attends as usual in
    this step, but its keys / values are appended to the cache of layers >= ``layer`` only if
    keep-logit - drop-logit > ``margin`` (official: argmax, margin 0). The prompt's KV is untouched.
    ``random_keep`` (an ablation, not the paper's) replaces the predictor by a seeded coin with that
    keep probability (``seed`` and the sample's index seed it); ``random_keep=1`` keeps everything.
    """

    name: ClassVar[str] = "dynamic_llava_decode"
    family: ClassVar[str] = "kv_cache"
    requires: ClassVar[dict] = {"dynamic_llava_text": ("a trained output-text predictor", "use smollm2-135m (it "
                                                       "ships one) or train one: mmlab train-tiny --dynamic-text")}
    layer: float = 2 / 32
    margin: float = 0.0
    random_keep: float | None = None
    seed: int = 0

    def check(self) -> None:
        if not (isinstance(self.layer, (int, float)) and 0 <= self.layer < 1):
            raise MethodError(f"{self.name}: layer is a fraction of depth in [0, 1) (2/32 in the paper), "
                              f"got {self.layer!r}")
        if self.random_keep is not None and not (isinstance(self.random_keep, (int, float))
                                                 and 0 <= self.random_keep <= 1):
            raise MethodError(f"{self.name}: random_keep is a keep probability in [0, 1] or None (use the "
                              f"predictor), got {self.random_keep!r}")

    def keeps_everything(self) -> bool:
        return self.random_keep == 1

    def decode_layer(self, ctx, layer, token):
        start = round(self.layer * ctx.n_layers)
        if layer < start or self.keeps_everything():
            return
        if layer == start:
            ctx.scratch["dynamic_keep"] = self.decide(ctx, token.hidden)
            ctx.trace.extra.setdefault("decode_kept", []).append(ctx.scratch["dynamic_keep"])
            ctx.trace.extra["decode_kept_from"] = start
        if not ctx.scratch["dynamic_keep"]:
            token.drop_kv()

    def decide(self, ctx, hidden: torch.Tensor) -> bool:
        """Keep this token's KV? (``hidden`` (1, 1, d), the token entering the sparse layer)."""
        if self.random_keep is not None:
            gen = ctx.scratch.setdefault("dynamic_rng", torch.Generator().manual_seed(
                1_000_003 * self.seed + ctx.sample_index))
            return bool(torch.rand((), generator=gen) < self.random_keep)
        predictor = ctx.extras["dynamic_llava_text"]
        logits = predictor(hidden.to(next(predictor.parameters()).dtype)).float()[0, -1]
        return bool(logits[0] - logits[1] > self.margin)
