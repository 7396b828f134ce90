"""Many-sample helpers over the engine: VQA accuracy and perplexity.

Every number here is aggregated from Traces: FLOPs from their per-layer token counts,
KV bytes from the cache tensors they measured, times from their wall-clocks.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mmlab.engine import extend, prefill, run
from mmlab.methods.base import MethodError


def normalise(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


@dataclass
class EvalResult:
    accuracy: float  # overall, 0..1
    by_type: dict[str, float]  # question type -> accuracy
    flops: float  # mean prefill FLOPs of the language model (from the Traces' token counts)
    kv_bytes: float  # mean KV-cache bytes held after prefill
    prefill_ms: float  # median prefill wall-clock
    method_ms: float  # median time spent inside the methods' stages (selection overhead)
    n: int
    rows: list[dict] = field(default_factory=list, repr=False)  # one per sample

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for ``mmlab.record`` / tables."""
        out = {"accuracy": self.accuracy, "tflops": self.tflops, "kv_bytes": self.kv_bytes,
               "prefill_ms": self.prefill_ms, "method_ms": self.method_ms, "n": self.n}
        out.update({f"acc_{k}": v for k, v in self.by_type.items()})
        return out


def evaluate(bundle, samples, methods=(), *, progress: bool = True, max_new_tokens: int | None = None) -> EvalResult:
    """Greedy-answer accuracy (first word, case-insensitive) per question type."""
    if not samples:
        raise MethodError("evaluate() needs at least one sample")
    rows = []
    for i, s in enumerate(tqdm(samples, desc=f"eval {bundle.name}", disable=not progress, mininterval=2)):
        tr = run(bundle, s, methods, max_new_tokens=max_new_tokens, sample_index=i)
        rows.append({"uid": getattr(s, "uid", i), "qtype": getattr(s, "qtype", "all"), "answer": s.answer,
                     "pred": tr.answer, "correct": normalise(tr.answer) == normalise(s.answer),
                     "prefill_flops": tr.flops["prefill"], "kv_bytes": tr.kv_bytes,
                     "prefill_ms": tr.timings["prefill_ms"], "method_ms": tr.timings.get("method_ms", 0.0),
                     "image_tokens": tr.image_tokens_per_layer()[0],
                     "mean_tokens_per_layer": sum(tr.tokens_per_layer) / len(tr.tokens_per_layer)})
    by_type: dict[str, list[bool]] = {}
    for r in rows:
        by_type.setdefault(r["qtype"], []).append(r["correct"])
    return EvalResult(
        accuracy=sum(r["correct"] for r in rows) / len(rows),
        by_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        flops=statistics.fmean(r["prefill_flops"] for r in rows),
        kv_bytes=statistics.fmean(r["kv_bytes"] for r in rows),
        prefill_ms=statistics.median(r["prefill_ms"] for r in rows),
        method_ms=statistics.median(r["method_ms"] for r in rows),
        n=len(rows), rows=rows)


def keep_param(name: str) -> str:
    """The parameter that sets how many visual tokens a method keeps (``keep_ratio``, or ``ratio``)."""
    import dataclasses

    from mmlab.methods.base import _REGISTRY

    fields = {f.name for f in dataclasses.fields(_REGISTRY[name])} if name in _REGISTRY else set()
    for p in ("keep_ratio", "ratio"):
        if p in fields:
            return p
    raise MethodError(f"method {name!r} has no keep_ratio / ratio parameter to sweep")


def keep_ratio_grid(bundle, samples, methods: list[str], keep_ratios: list[float], *, progress: bool = True):
    """Accuracy, per-type accuracy, FLOPs and times of every method at every keep ratio, plus the
    unpruned model: one row per (method, keep_ratio) in a DataFrame (``flops_ratio`` = dense / method)."""
    import pandas as pd

    from mmlab.methods.base import get

    dense = evaluate(bundle, samples, [], progress=False)
    rows = [{"method": "none", "keep_ratio": 1.0, **dense.metrics(),
             "image_tokens_layer0": statistics.fmean(r["image_tokens"] for r in dense.rows)}]
    points = [(m, r) for m in methods for r in keep_ratios]
    for name, ratio in tqdm(points, desc="methods x keep ratios", disable=not progress):
        res = evaluate(bundle, samples, [get(name, **{keep_param(name): ratio})], progress=False)
        img = statistics.fmean(r["image_tokens"] for r in res.rows)
        rows.append({"method": name, "keep_ratio": ratio, **res.metrics(), "image_tokens_layer0": img})
    df = pd.DataFrame(rows)
    df["flops_ratio"] = dense.flops / (df.tflops * 1e12)
    return df


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int  # tokens scored
    windows: int
    kv_bytes: float  # mean KV bytes held when the scored tokens were read


def perplexity(bundle, text: str, methods=(), *, window: int = 512, context: int | None = None,
               max_windows: int | None = 8, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``text`` in non-overlapping windows of ``window`` tokens.

    ``context=None``: every token of a window after the first is scored from one prefill.
    ``context=c``: the first ``c`` tokens are prefilled (methods act there, e.g. KV
    compression at ``after_prefill``), and the remaining ``window - c`` tokens are scored
    teacher-forced against that cache: the perplexity of the continuation.
    """
    if bundle.multimodal and bundle.kind == "tiny-llava":
        raise MethodError("perplexity needs a text LM (e.g. smollm2-135m); tiny-llava only knows the shapes vocabulary")
    if context is not None and not 0 < context < window:
        raise MethodError(f"context must be in 1..window-1 ({window - 1}), got {context}")
    ids = bundle.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_win = len(ids) // window
    if n_win == 0:
        raise MethodError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    if max_windows:
        n_win = min(n_win, max_windows)
    from mmlab.models import Inputs

    nll_sum, count, kv = 0.0, 0, []
    for w in tqdm(range(n_win), desc=f"ppl {bundle.name}", disable=not progress, mininterval=2):
        chunk = ids[w * window:(w + 1) * window][None]
        if context is None:
            p = prefill(bundle, Inputs(chunk), methods, all_logits=True, sample_index=w)
            logits, targets = p.logits[:-1], chunk[0, 1:]
        else:
            p = prefill(bundle, Inputs(chunk[:, :context]), methods, sample_index=w)
            cont = extend(bundle, p.cache, chunk[:, context:], p.next_position)
            logits = torch.cat([p.logits[-1:], cont[:-1]])
            targets = chunk[0, context:]
        kv.append(p.trace.kv_bytes)
        nll_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    nll = nll_sum / count
    return PerplexityResult(math.exp(nll), nll, count, n_win, statistics.fmean(kv))
