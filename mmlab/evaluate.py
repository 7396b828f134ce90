"""Many-sample helpers over the engine: VQA accuracy and perplexity.

Every number here is aggregated from Traces: FLOPs from their per-layer token counts,
KV bytes from the cache tensors they measured, times from their wall-clocks.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mmlab.engine import extend, prefill, run
from mmlab.methods.base import MethodError
from mmlab.quantize import applied


def normalise(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def is_correct(pred: str, sample) -> bool:
    """First word, case-insensitive (VQA); or the answer anywhere in the reply (``match="contains"``)."""
    if getattr(sample, "match", "first_word") == "contains":
        return sample.answer.lower() in pred.lower()
    return normalise(pred) == normalise(sample.answer)


@dataclass
class EvalResult:
    accuracy: float  # overall, 0..1
    by_type: dict[str, float]  # question type -> accuracy
    flops: float  # mean prefill FLOPs of the language model (from the Traces' token counts)
    kv_bytes: float  # mean KV-cache bytes held after prefill
    vision_retention: float  # mean over layers of the fraction of visual tokens each layer processed
    prefill_ms: float  # median prefill wall-clock
    method_ms: float  # median time spent inside the methods' stages (selection overhead)
    decode_ms: float  # median of the per-sample median ms per generated token (NaN: one-token answers)
    n: int
    rows: list[dict] = field(default_factory=list, repr=False)  # one per sample
    weight_bits: float = float("nan")  # effective bits per quantized weight (weight quantization methods)

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for ``mmlab.record`` / tables."""
        out = {"accuracy": self.accuracy, "tflops": self.tflops, "kv_bytes": self.kv_bytes,
               "vision_retention": self.vision_retention,
               "prefill_ms": self.prefill_ms, "method_ms": self.method_ms, "decode_ms": self.decode_ms, "n": self.n}
        if not math.isnan(self.weight_bits):
            out["weight_bits"] = self.weight_bits
        out.update({f"acc_{k}": v for k, v in self.by_type.items()})
        return out


def evaluate(bundle, samples, methods=(), *, progress: bool = True, max_new_tokens: int | None = None) -> EvalResult:
    """Greedy-answer accuracy (first word, case-insensitive) per question type."""
    if not samples:
        raise MethodError("evaluate() needs at least one sample")
    rows, methods = [], list(methods)
    with applied(bundle, methods) as quantized:  # quantize the weights once, not per sample
        for i, s in enumerate(tqdm(samples, desc=f"eval {bundle.name}", disable=not progress, mininterval=2)):
            tr = run(bundle, s, methods, max_new_tokens=max_new_tokens, sample_index=i)
            rows.append({"uid": getattr(s, "uid", i), "qtype": getattr(s, "qtype", "all"), "answer": s.answer,
                         "pred": tr.answer, "correct": is_correct(tr.answer, s),
                         "prefill_flops": tr.flops["prefill"], "kv_bytes": tr.kv_bytes,
                         "prefill_ms": tr.timings["prefill_ms"], "method_ms": tr.timings.get("method_ms", 0.0),
                         "decode_ms": tr.timings.get("decode_ms_per_token", float("nan")),
                         "image_tokens": tr.image_tokens_per_layer()[0],
                         "vision_retention": (sum(tr.image_tokens_per_layer()) / len(tr.layer_tokens)
                                              / max(1, tr.n_image_tokens_in)),
                         "mean_tokens_per_layer": sum(tr.tokens_per_layer) / len(tr.tokens_per_layer)})
    by_type: dict[str, list[bool]] = {}
    for r in rows:
        by_type.setdefault(r["qtype"], []).append(r["correct"])
    return EvalResult(
        accuracy=sum(r["correct"] for r in rows) / len(rows),
        by_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        flops=statistics.fmean(r["prefill_flops"] for r in rows),
        kv_bytes=statistics.fmean(r["kv_bytes"] for r in rows),
        vision_retention=statistics.fmean(r["vision_retention"] for r in rows),
        prefill_ms=statistics.median(r["prefill_ms"] for r in rows),
        method_ms=statistics.median(r["method_ms"] for r in rows),
        decode_ms=_median_finite(r["decode_ms"] for r in rows),
        n=len(rows), rows=rows, weight_bits=quantized.weight_bits if quantized else float("nan"))


def _median_finite(values) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


def keep_param(name: str) -> str:
    """The parameter that sets how much a method keeps: ``keep_ratio`` / ``ratio`` (visual tokens)
    or ``budget`` (KV cache)."""
    import dataclasses

    from mmlab.methods.base import _REGISTRY

    fields = {f.name for f in dataclasses.fields(_REGISTRY[name])} if name in _REGISTRY else set()
    for p in ("keep_ratio", "ratio", "budget"):
        if p in fields:
            return p
    raise MethodError(f"method {name!r} has no keep_ratio / ratio / budget parameter to sweep")


def _column(name: str) -> str:
    return "budget" if keep_param(name) == "budget" else "keep_ratio"


def method_grid(bundle, samples, methods: list[str], values: list[float], *, progress: bool = True):
    """Accuracy, per-type accuracy, FLOPs, KV bytes and times of every method at every keep
    ratio / budget, plus the unmodified model (method ``none`` at 1.0): one row per point
    (``flops_ratio`` = unmodified / method prefill FLOPs; the value column is ``keep_ratio``
    for visual-token methods, ``budget`` for KV methods). A setting a method refuses on these
    inputs (``MethodError``) gets a row with its ``error`` and no metrics."""
    import pandas as pd

    from mmlab.methods.base import get

    dense = evaluate(bundle, samples, [], progress=False)
    img = lambda res: statistics.fmean(r["image_tokens"] for r in res.rows)  # noqa: E731
    cols = {_column(n) for n in methods} or {"keep_ratio"}
    rows = [{"method": "none", **{c: 1.0 for c in cols}, **dense.metrics(), "image_tokens_layer0": img(dense)}]
    points = [(m, v) for m in methods for v in values]
    for name, value in tqdm(points, desc="methods x settings", disable=not progress):
        try:
            res = evaluate(bundle, samples, [get(name, **{keep_param(name): value})], progress=False)
        except MethodError as e:  # a setting the rule refuses here (e.g. budget below SnapKV's window)
            rows.append({"method": name, _column(name): value, "error": str(e)})
            continue
        rows.append({"method": name, _column(name): value, **res.metrics(), "image_tokens_layer0": img(res)})
    df = pd.DataFrame(rows)
    df["flops_ratio"] = dense.flops / (df.tflops * 1e12)
    return df


def perplexity_grid(bundle, text: str, methods: list[str], budgets: list[float], *, window: int = 1024,
                    context: int = 768, max_windows: int = 4, progress: bool = True):
    """Continuation perplexity (``context`` tokens prefilled and compressed, the rest of each
    ``window`` scored) of every KV method at every budget, plus the uncompressed cache."""
    import pandas as pd

    from mmlab.methods.base import get

    points = [("none", 1.0)] + [(m, b) for m in methods for b in budgets]
    rows = []
    for name, budget in tqdm(points, desc="perplexity x budgets", disable=not progress):
        ms = [] if name == "none" else [get(name, **{keep_param(name): budget})]
        t = time.perf_counter()
        try:
            r = perplexity(bundle, text, ms, window=window, context=context, max_windows=max_windows, progress=False)
        except MethodError as e:
            rows.append({"method": name, "budget": budget, "error": str(e)})
            continue
        rows.append({"method": name, "budget": budget, "perplexity": r.perplexity, "nll": r.nll,
                     "kv_bytes": r.kv_bytes, "tokens": r.n_tokens, "seconds": time.perf_counter() - t})
    return pd.DataFrame(rows)


def arank(bundle, samples) -> list[float]:
    """gamma-MoD's ARank per decoder layer: the mean over heads (and over ``samples``, the
    calibration set) of the rank of each layer's causal attention map, diagonal zeroed.
    Scores are recomputed beside SDPA; a model whose attention cannot be recomputed raises."""
    from mmlab.methods.mod import attention_rank

    layers = list(range(bundle.n_layers))
    per_layer = [[] for _ in layers]
    for s in samples:
        tr = run(bundle, s, attention_layers=layers, max_new_tokens=1)
        for i in layers:
            per_layer[i].append(attention_rank(tr.attentions[i]))
    return [statistics.fmean(v) for v in per_layer]


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int  # tokens scored
    windows: int
    kv_bytes: float  # mean KV bytes held when the scored tokens were read
    prefill_ms: float = float("nan")  # median prefill (+ the methods' compression) per window
    weight_bits: float = float("nan")  # effective bits per quantized weight (weight quantization methods)


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

    nll_sum, count, kv, ms, methods = 0.0, 0, [], [], list(methods)
    with applied(bundle, methods) as quantized:
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
            ms.append(p.trace.timings["prefill_ms"])
            nll_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
    nll = nll_sum / count
    return PerplexityResult(math.exp(nll), nll, count, n_win, statistics.fmean(kv), statistics.median(ms),
                            quantized.weight_bits if quantized else float("nan"))


def quant_grid(bundle, configs: list[dict], *, text: str | None = None, samples=None, window: int = 512,
               context: int | None = None, max_windows: int = 8, progress: bool = True):
    """One row per quantization config (``{"method": name, **params}``, or ``{"method": "none"}``):
    perplexity of ``text`` (a text LM) or accuracy on ``samples``, effective bits per weight,
    packed model bytes, KV bytes and the one-time quantization seconds. Invalid configs become
    rows with an ``error`` (the sweep goes on)."""
    import pandas as pd

    from mmlab.methods.base import get
    from mmlab.quantize import quantized_weights

    if (text is None) == (samples is None):
        raise MethodError("quant_grid needs exactly one of text= (perplexity) or samples= (accuracy)")
    rows = []
    for cfg in tqdm(configs, desc="quantization configs", disable=not progress):
        params = {k: v for k, v in cfg.items() if k != "method"}
        row = {"method": cfg["method"], **{k: ("ch" if k == "group_size" and v is None else v)
                                          for k, v in params.items()}}
        try:
            ms = [] if cfg["method"] == "none" else [get(cfg["method"], **params)]
            t = time.perf_counter()
            qw = quantized_weights(bundle, ms[0]) if ms and getattr(ms[0], "quantizes_weights", False) else None
            row["quantize_s"] = time.perf_counter() - t
            if qw is not None:
                row.update(weight_bits=qw.weight_bits, packed_bytes=qw.packed_bytes, outliers=qw.outliers)
            if text is not None:
                r = perplexity(bundle, text, ms, window=window, context=context, max_windows=max_windows, progress=False)
                row.update(perplexity=r.perplexity, kv_bytes=r.kv_bytes)
            else:
                r = evaluate(bundle, samples, ms, progress=False)
                row.update(accuracy=r.accuracy, kv_bytes=r.kv_bytes)
        except MethodError as e:
            row["error"] = str(e)
        rows.append(row)
    return pd.DataFrame(rows)
