"""The public run functions and the many-sample helpers over the engine.

``run`` / ``prefill`` are the engine's, with a run's weight quantization swapped in around
them (``mmlab.quantize.applied``). ``evaluate`` (VQA accuracy), ``perplexity`` and the one
grid runner ``grid`` aggregate Traces: FLOPs from their per-layer token counts, KV bytes from
the cache tensors they measured, times from their wall-clocks.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mmlab import engine
from mmlab.arch import Inputs
from mmlab.flops import decode_without_cache
from mmlab.methods import Method, MethodError, as_methods, get, knob, method_class, needs_swap
from mmlab.quantize import applied, quantized_weights
from mmlab.trace import Trace


# --- one sample ----------------------------------------------------------------------------------
def run(bundle, sample, methods=(), **kw) -> Trace:
    """Prefill + greedy decode of one sample under ``methods`` (methods, names or spec strings; see
    ``mmlab.engine.run`` for the keyword arguments), weight quantization included; returns the Trace."""
    methods = as_methods(methods)
    with applied(bundle, methods) as quantized:  # weights stay quantized through decoding
        trace = engine.run(bundle, sample, methods, **kw)
    if quantized is not None:
        trace.extra.update(quantized.summary())
    return trace


def prefill(bundle, sample, methods=(), **kw) -> engine.Prefill:
    """The prefill alone (and its after_prefill methods), weight quantization included."""
    methods = as_methods(methods)
    with applied(bundle, methods) as quantized:
        p = engine.prefill(bundle, sample, methods, **kw)
    if quantized is not None:
        p.trace.extra.update(quantized.summary())
    return p


# --- accuracy ------------------------------------------------------------------------------------
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
    sparse_flops: float  # ... with restricted attention counted as a sparse kernel would run it (flops.py)
    kv_bytes: float  # mean KV-cache bytes held after prefill
    vision_retention: float  # mean over layers of the fraction of visual tokens each layer processed
    prefill_ms: float  # median prefill wall-clock
    method_ms: float  # median time spent inside the methods' stages (selection overhead)
    decode_ms: float  # median of the per-sample median ms per generated token (NaN: one-token answers)
    n: int
    rows: list[dict] = field(default_factory=list, repr=False)  # one per sample
    weight_bits: float = float("nan")  # effective bits per quantized weight (weight quantization methods)
    prefill_ms_spread: float = float("nan")  # interquartile range / median of the prefill times (``spread``)

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for ``mmlab.record`` / tables."""
        out = {"accuracy": self.accuracy, "tflops": self.tflops, "sparse_tflops": self.sparse_flops / 1e12,
               "kv_bytes": self.kv_bytes,
               "vision_retention": self.vision_retention,
               "prefill_ms": self.prefill_ms, "prefill_ms_spread": self.prefill_ms_spread, "method_ms": self.method_ms,
               "decode_ms": self.decode_ms, "n": self.n}
        if not math.isnan(self.weight_bits):
            out["weight_bits"] = self.weight_bits
        out.update({f"acc_{k}": v for k, v in self.by_type.items()})
        return out


def _sample_row(i: int, s, tr: Trace) -> dict:
    img = tr.image_tokens_per_layer()
    return {"uid": getattr(s, "uid", i), "qtype": getattr(s, "qtype", "all"), "answer": s.answer,
            "pred": tr.answer, "correct": is_correct(tr.answer, s),
            "prefill_flops": tr.flops["prefill"], "prefill_sparse_flops": tr.flops["prefill_sparse"],
            "kv_bytes": tr.kv_bytes,
            "prefill_ms": tr.timings["prefill_ms"], "method_ms": tr.timings.get("method_ms", 0.0),
            "decode_ms": tr.timings.get("decode_ms_per_token", float("nan")), "image_tokens": img[0],
            "vision_retention": sum(img) / len(tr.layer_tokens) / max(1, tr.n_image_tokens_in),
            "mean_tokens_per_layer": sum(tr.tokens_per_layer) / len(tr.tokens_per_layer)}


def evaluate(bundle, samples, methods=(), *, progress: bool = True, max_new_tokens: int | None = None) -> EvalResult:
    """Greedy-answer accuracy (first word, case-insensitive) per question type."""
    res = evaluate_many(bundle, samples, [as_methods(methods)], progress=progress, max_new_tokens=max_new_tokens)[0]
    if isinstance(res, MethodError):
        raise res
    return res


def _missing_extras(bundle, lists: list) -> list:
    """Per method list: the ``MethodError`` of a method needing checkpoint extras the bundle lacks (refused
    before any sample), else None."""
    out: list = [None] * len(lists)
    for k, ms in enumerate(lists):
        try:
            for m in ms:
                m.check_extras(bundle.name, bundle.extras)
        except MethodError as e:
            out[k] = e
    return out


def evaluate_many(bundle, samples, method_lists: list, *, progress: bool = True,
                  max_new_tokens: int | None = None) -> list[EvalResult | MethodError]:
    """``evaluate`` of each method list on the same samples. Lists without weight quantization run
    sample by sample through ``engine.run_many`` (those acting only after the prefill share each
    sample's dense prefill); a weight-quantized list runs alone with its weights swapped in once.
    A list refused on some sample gets that ``MethodError`` in place of a result."""
    if not samples:
        raise MethodError("evaluate() needs at least one sample")
    lists = [list(ms) for ms in method_lists]
    out = _missing_extras(bundle, lists)
    shared = [k for k, ms in enumerate(lists) if out[k] is None and not any(needs_swap(m) for m in ms)]
    rows: dict[int, list] = {k: [] for k in shared}
    for i, s in enumerate(tqdm(samples, desc=f"eval {bundle.name}", disable=not progress or not shared, mininterval=2)):
        live = [k for k in shared if out[k] is None]
        if not live:  # every list refused: nothing left to run
            break
        for k, tr in zip(live, engine.run_many(bundle, s, [lists[k] for k in live], max_new_tokens=max_new_tokens,
                                               sample_index=i)):
            if isinstance(tr, MethodError):
                out[k] = tr
            else:
                rows[k].append(_sample_row(i, s, tr))
    for k in shared:
        out[k] = out[k] or _result(rows[k])
    for k in (k for k in range(len(lists)) if k not in rows and out[k] is None):
        try:
            with applied(bundle, lists[k]) as quantized:  # quantize the weights once, not per sample
                r = [_sample_row(i, s, engine.run(bundle, s, lists[k], max_new_tokens=max_new_tokens, sample_index=i))
                     for i, s in enumerate(tqdm(samples, desc=f"eval {bundle.name}", disable=not progress,
                                                mininterval=2))]
            out[k] = _result(r, quantized.weight_bits if quantized else float("nan"))
        except MethodError as e:
            out[k] = e
    return out


def _result(rows: list[dict], weight_bits: float = float("nan")) -> EvalResult:
    by_type: dict[str, list[bool]] = {}
    for r in rows:
        by_type.setdefault(r["qtype"], []).append(r["correct"])
    return EvalResult(
        accuracy=sum(r["correct"] for r in rows) / len(rows),
        by_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        flops=statistics.fmean(r["prefill_flops"] for r in rows),
        sparse_flops=statistics.fmean(r["prefill_sparse_flops"] for r in rows),
        kv_bytes=statistics.fmean(r["kv_bytes"] for r in rows),
        vision_retention=statistics.fmean(r["vision_retention"] for r in rows),
        prefill_ms=statistics.median(r["prefill_ms"] for r in rows),
        method_ms=statistics.median(r["method_ms"] for r in rows),
        decode_ms=_median_finite(r["decode_ms"] for r in rows),
        n=len(rows), rows=rows, weight_bits=weight_bits, prefill_ms_spread=spread([r["prefill_ms"] for r in rows]))


def spread(values: list[float]) -> float:
    """Interquartile range over median of repeated timings: ~0.1 on a quiet machine; a large value says
    the machine was busy and the median is not to be read as a result (NaN below 4 values)."""
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) < 4:
        return float("nan")
    q1, _, q3 = statistics.quantiles(vals, n=4)
    return (q3 - q1) / statistics.median(vals)


def _median_finite(values) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


# --- perplexity ----------------------------------------------------------------------------------
@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int  # tokens scored
    windows: int
    kv_bytes: float  # mean KV bytes held when the scored tokens were read
    prefill_ms: float = float("nan")  # median prefill (+ the methods' compression) per window
    weight_bits: float = float("nan")  # effective bits per quantized weight (weight quantization methods)
    prefill_ms_spread: float = float("nan")  # interquartile range / median of the windows' prefill times
    generated_kept: float = float("nan")  # share of the decoded tokens whose KV a decode-time method kept


def _windows(bundle, text: str, window: int, context: int | None, max_windows: int | None) -> torch.Tensor:
    if not bundle.adapter.text_perplexity:
        raise MethodError(f"perplexity needs a text LM that reads real text (e.g. smollm2-135m); {bundle.name}'s "
                          f"LM does not")
    if context is not None and not 0 < context < window:
        raise MethodError(f"context must be in 1..window-1 ({window - 1}), got {context}")
    ids = bundle.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_win = len(ids) // window
    if n_win == 0:
        raise MethodError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    n_win = min(n_win, max_windows) if max_windows else n_win
    return ids[: n_win * window].view(n_win, window)


def perplexity(bundle, text: str, methods=(), *, window: int = 512, context: int | None = None,
               max_windows: int | None = 8, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``text`` in non-overlapping windows of ``window`` tokens.

    ``context=None``: every token of a window after the first is scored from one prefill.
    ``context=c``: the first ``c`` tokens are prefilled (methods act there, e.g. KV
    compression at ``after_prefill``), and the remaining ``window - c`` tokens are scored
    teacher-forced against that cache: the perplexity of the continuation.
    """
    res = perplexity_many(bundle, text, [as_methods(methods)], window=window, context=context, max_windows=max_windows,
                          progress=progress)[0]
    if isinstance(res, MethodError):
        raise res
    return res


def perplexity_many(bundle, text: str, method_lists: list, *, window: int = 512, context: int | None = None,
                    max_windows: int | None = 8, progress: bool = True) -> list[PerplexityResult | MethodError]:
    """``perplexity`` of each method list on the same windows, window by window (lists acting only
    after the prefill share each window's dense prefill); a weight-quantized list runs alone with
    its weights swapped in once. A refused list gets its ``MethodError``."""
    chunks = _windows(bundle, text, window, context, max_windows)
    lists = [list(ms) for ms in method_lists]
    decoding = [m.name for ms in lists for m in ms if m.acts_in_decode_layers()]
    if decoding and context is None:
        raise MethodError(f"{decoding[0]} acts while decoding, and context=None scores the whole window from one "
                          f"prefill; give a context (perplexity(context={window // 2}) or mmlab eval --context "
                          f"{window // 2}) so the rest is decoded")
    out = _missing_extras(bundle, lists)
    shared = [k for k, ms in enumerate(lists) if out[k] is None and not any(needs_swap(m) for m in ms)]
    acc = {k: [] for k in range(len(lists))}  # per list: (nll sum, tokens, kv bytes, prefill ms) per window
    for w in tqdm(range(len(chunks)), desc=f"ppl {bundle.name}", disable=not progress or not shared, mininterval=2):
        live = [k for k in shared if out[k] is None]
        if not live:  # every list refused: nothing left to run
            break
        for k, p in zip(live, _window_prefills(bundle, chunks[w][None], [lists[k] for k in live], context, w)):
            if isinstance(p, MethodError):
                out[k] = p
            else:
                acc[k].append(_window_nll(bundle, p, chunks[w][None], context, lists[k]))
    for k in (k for k in range(len(lists)) if k not in shared and out[k] is None):
        try:
            with applied(bundle, lists[k]) as quantized:
                for w in range(len(chunks)):
                    p = next(_window_prefills(bundle, chunks[w][None], [lists[k]], context, w))
                    if isinstance(p, MethodError):
                        raise p
                    acc[k].append(_window_nll(bundle, p, chunks[w][None], context, lists[k]))
            out[k] = _ppl_result(acc[k], quantized.weight_bits if quantized else float("nan"))
        except MethodError as e:
            out[k] = e
    return [out[k] or _ppl_result(acc[k]) for k in range(len(lists))]


def _window_prefills(bundle, chunk: torch.Tensor, lists: list, context: int | None, w: int):
    if context is None:
        return engine.prefills(bundle, Inputs(chunk), lists, all_logits=True, sample_index=w)
    return engine.prefills(bundle, Inputs(chunk[:, :context]), lists, sample_index=w)


def _window_nll(bundle, p, chunk: torch.Tensor, context: int | None, methods) -> tuple:
    """(summed NLL, tokens scored, KV bytes, prefill ms, the decode-time keep decisions) of one window from its
    prefill ``p`` (the continuation through ``engine.continuation``)."""
    if context is None:
        logits, targets = p.logits[:-1], chunk[0, 1:]
    else:
        cont = engine.continuation(bundle, p, methods, chunk[:, context:])
        logits, targets = torch.cat([p.logits[-1:], cont[:-1]]), chunk[0, context:]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    return nll, targets.numel(), p.trace.kv_bytes, p.trace.timings["prefill_ms"], p.trace.extra.get("decode_kept", [])


def _ppl_result(windows: list[tuple], weight_bits: float = float("nan")) -> PerplexityResult:
    nll = sum(w[0] for w in windows) / sum(w[1] for w in windows)
    return PerplexityResult(math.exp(nll), nll, sum(w[1] for w in windows), len(windows),
                            statistics.fmean(w[2] for w in windows), statistics.median(w[3] for w in windows),
                            weight_bits, spread([w[3] for w in windows]), _share([k for w in windows for k in w[4]]))


def _share(flags: list) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


# --- grids -----------------------------------------------------------------------------------------
def knob_points(methods: list[str], values: list) -> list[dict]:
    """Every method at every value of its sweep knob (keep_ratio / ratio / budget / bits):
    configs for ``grid``."""
    return [{"method": name, knob(name): v} for name in methods for v in values]


def _describe(cfg) -> tuple[str, dict]:
    """(label, parameters given) of one grid point: ``{"method": name, **params}`` (``"none"`` = no
    method, optional ``"label"``), ``{"label": ..., "methods": [Method, ...]}``, a Method or a list."""
    if isinstance(cfg, Method):
        return cfg.name, {}
    if isinstance(cfg, (list, tuple)):
        return "+".join(m.name for m in cfg) or "none", {}
    if "methods" in cfg:
        return cfg.get("label") or "+".join(m.name for m in cfg["methods"]) or "none", {}
    return cfg.get("label", cfg["method"]), {k: v for k, v in cfg.items() if k not in ("method", "label")}


def _methods(cfg) -> list[Method]:
    if isinstance(cfg, Method):
        return [cfg]
    if isinstance(cfg, (list, tuple)):
        return list(cfg)
    if "methods" in cfg:
        return list(cfg["methods"])
    return [] if cfg["method"] == "none" else [get(cfg["method"], **_describe(cfg)[1])]


def _setting(cfg, params: dict) -> dict:
    """The table's setting column of a ``{"method": name, knob: value}`` point: ``budget`` for a KV
    method, ``keep_ratio`` for a visual-token / MoD one (whose knob may be called ``ratio``)."""
    if not isinstance(cfg, dict) or cfg.get("method", "none") == "none":
        return {}
    k = method_class(cfg["method"]).knob
    if k not in params or k not in ("keep_ratio", "ratio", "budget"):
        return {}
    return {"budget" if k == "budget" else "keep_ratio": params[k]}


def _measure(bundle, lists: list, samples, text, ppl_kw) -> list:
    if samples is not None:
        return evaluate_many(bundle, samples, lists, progress=False)
    return perplexity_many(bundle, text, lists, progress=False, **ppl_kw)


def _metrics(res) -> dict:
    if isinstance(res, EvalResult):
        return {**res.metrics(), "image_tokens_layer0": statistics.fmean(r["image_tokens"] for r in res.rows)}
    return {"perplexity": res.perplexity, "nll": res.nll, "kv_bytes": res.kv_bytes, "tokens": res.n_tokens,
            "prefill_ms": res.prefill_ms, "prefill_ms_spread": res.prefill_ms_spread,
            **({} if math.isnan(res.generated_kept) else {"generated_kept": res.generated_kept})}


def grid(bundle, configs: list, *, samples=None, text: str | None = None, baseline: bool = True, window: int = 512,
         context: int | None = None, max_windows: int | None = 8, progress: bool = True,
         other_texts: dict[str, str] | None = None):
    """One row per configuration: accuracy on ``samples`` (with per-type accuracy, FLOPs, KV bytes,
    times) or perplexity of ``text`` (``window`` / ``context`` / ``max_windows`` as ``perplexity``),
    plus the weight bits, packed bytes and one-time quantization seconds of weight methods.

    ``configs``: ``{"method": name, **params}`` dicts (e.g. ``knob_points(methods, values)``),
    ``{"label": ..., "methods": [...]}``, or method lists. With ``baseline`` the unmodified model
    comes first (method ``none``, setting 1.0) and ``flops_ratio`` = its FLOPs / each row's. A
    setting the rule refuses here (``MethodError``) becomes a row with its ``error``.

    The configurations without weight quantization run together, sample by sample (those whose
    methods act only after the prefill share each sample's dense prefill and scores), so their
    ``seconds`` is their batch's wall-clock divided among them; a weight configuration is timed alone.
    ``other_texts`` ({name: text}) adds a ``perplexity_<name>`` column per text (same windows), e.g.
    a domain the calibration never saw."""
    import pandas as pd

    if (text is None) == (samples is None):
        raise MethodError("grid needs exactly one of samples= (accuracy) or text= (perplexity)")
    ppl_kw = dict(window=window, context=context, max_windows=max_windows)
    others = other_texts or {}
    if others and samples is not None:
        raise MethodError("other_texts= adds perplexity columns: use it with text=, not samples=")
    points = ([{"method": "none"}] if baseline else []) + list(configs)
    rows, lists = [], {}
    for k, cfg in enumerate(points):
        label, params = _describe(cfg)
        shown = {p: ("ch" if p == "group_size" and v is None else v) for p, v in params.items()}
        rows.append({"method": label, **shown})
        try:
            rows[k].update(_setting(cfg, params))
            lists[k] = _methods(cfg)
        except MethodError as e:
            rows[k]["error"] = str(e)
    batch = [k for k, ms in lists.items() if not any(needs_swap(m) for m in ms)]
    t = time.perf_counter()
    results = _measure(bundle, [lists[k] for k in batch], samples, text, ppl_kw) if batch else []
    for k, res in zip(batch, results):
        rows[k].update({"error": str(res)} if isinstance(res, MethodError) else _metrics(res))
        rows[k]["seconds"] = (time.perf_counter() - t) / len(batch)
    for name, other in others.items():
        for k, res in zip(batch, _measure(bundle, [lists[k] for k in batch], None, other, ppl_kw) if batch else []):
            rows[k][f"perplexity_{name}"] = getattr(res, "perplexity", float("nan"))
    for k in tqdm([k for k in lists if k not in batch], desc=f"grid {bundle.name}", disable=not progress):
        rows[k].update(_weight_point(bundle, lists[k], samples, text, ppl_kw, others))
    df = pd.DataFrame(rows)
    if baseline:
        for col in ("keep_ratio", "budget"):
            if col in df:
                df.loc[df.method == "none", col] = 1.0
        if "tflops" in df:
            df["flops_ratio"] = df.tflops[df.method == "none"].iloc[0] / df.tflops
            df["sparse_flops_ratio"] = df.tflops[df.method == "none"].iloc[0] / df.sparse_tflops
    return df


def _weight_point(bundle, methods: list, samples, text, ppl_kw, others: dict) -> dict:
    """A weight-quantized configuration: its one-time quantization (timed), then its evaluation
    (and its perplexity on each of ``others``)."""
    t = time.perf_counter()
    try:
        wq = [m for m in methods if m.quantizes_weights]
        qw = quantized_weights(bundle, wq[0]) if wq else None  # (activation quantizers alone: no weights)
        row = {} if qw is None else {"quantize_s": time.perf_counter() - t, "weight_bits": qw.weight_bits,
                                     "packed_bytes": qw.packed_bytes, "outliers": qw.outliers, **qw.notes.get("*", {})}
        res = _measure(bundle, [methods], samples, text, ppl_kw)[0]
        row["seconds"] = time.perf_counter() - t
        for name, other in others.items():
            row[f"perplexity_{name}"] = getattr(_measure(bundle, [methods], None, other, ppl_kw)[0], "perplexity",
                                                float("nan"))
    except MethodError as e:
        return {"error": str(e)}
    return {**row, **({"error": str(res)} if isinstance(res, MethodError) else _metrics(res))}


# --- per-layer statistics -------------------------------------------------------------------------------
def arank(bundle, samples) -> list[float]:
    """gamma-MoD's ARank per decoder layer: the mean over heads (and over ``samples``, the
    calibration set) of the rank of each layer's causal attention map, diagonal zeroed.
    Scores are recomputed beside SDPA; a model whose attention cannot be recomputed raises."""
    from mmlab.methods.mod import attention_rank

    layers = list(range(bundle.n_layers))
    per_layer = [[] for _ in layers]
    for s in samples:
        tr = engine.run(bundle, s, attention_layers=layers, max_new_tokens=1)
        for i in layers:
            per_layer[i].append(attention_rank(tr.attentions[i]))
    return [statistics.fmean(v) for v in per_layer]


def visual_heads(bundle, samples) -> torch.Tensor:
    """(layers, heads): how much each attention head of the LLM reads the image, averaged over
    ``samples`` (a calibration set, never the evaluated one): the attention mass that queries from the
    first visual token on put on visual keys, in the prefill. Stored in ``bundle.extras["visual_heads"]``,
    where YOPO's head cut reads it (``mmlab.methods.get("yopo")``). Scores are recomputed beside SDPA."""
    layers = list(range(bundle.n_layers))
    total, n = None, 0
    for s in samples:
        tr = engine.run(bundle, s, attention_layers=layers, max_new_tokens=1)
        is_img = tr.modality >= 0
        if not is_img.any():
            raise MethodError(f"visual_heads needs image samples; sample {n} of {bundle.name!r} has no image")
        first = int(torch.nonzero(is_img)[0])
        per = torch.stack([tr.attentions[i][:, first:][..., is_img].sum(-1).mean(-1) for i in layers])
        total, n = (per if total is None else total + per), n + 1
    if n == 0:
        raise MethodError("visual_heads needs at least one calibration sample")
    bundle.extras["visual_heads"] = total / n
    return bundle.extras["visual_heads"]


# --- free generation ---------------------------------------------------------------------------------
def generation(bundle, text: str, configs: list, *, n_prompts: int = 8, prompt: int = 128, max_new_tokens: int = 128,
               progress: bool = True):
    """Greedy continuations of ``n_prompts`` consecutive ``prompt``-token windows of ``text``, the unmodified
    model first, then each configuration (as ``grid`` takes them; no weight quantization). One row each:
    the KV bytes held at the end (``kv_ratio`` = the unmodified model's / this), the share of generated
    tokens whose KV a decode-time method kept, the agreement with the unmodified model's tokens (``same_prefix``:
    share before the first difference; ``token_match``: share equal position by position), decode FLOPs
    with the cache and without one (``flops.decode_without_cache``), their ratios, and decode ms per token."""
    import pandas as pd

    points = [{"method": "none"}, *configs]
    lists = [_methods(c) for c in points]
    if any(needs_swap(m) for ms in lists for m in ms):
        raise MethodError("generation() runs methods that act in the engine; measure weight quantization with grid()")
    chunks = _windows(bundle, text, prompt, None, n_prompts)
    traces = [[] for _ in points]
    for w in tqdm(range(len(chunks)), desc=f"generate {bundle.name}", disable=not progress, mininterval=2):
        for k, tr in enumerate(engine.run_many(bundle, Inputs(chunks[w][None]), lists, max_new_tokens=max_new_tokens,
                                               sample_index=w)):
            if isinstance(tr, MethodError):
                raise tr
            traces[k].append(tr)
    rows = [{"method": label, **params, **_generation_row(trs, traces[0])}
            for (label, params), trs in zip(map(_describe, points), traces)]
    df = pd.DataFrame(rows)
    for col, ratio in [("kv_bytes_final", "kv_ratio"), ("decode_tflops", "decode_flops_ratio"),
                       ("decode_tflops_nocache", "decode_flops_ratio_nocache")]:
        df[ratio] = df[col].iloc[0] / df[col]
    return df


def _generation_row(traces: list[Trace], dense: list[Trace]) -> dict:
    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) / max(1, len(b))

    return {"kv_bytes_final": statistics.fmean(tr.kv_bytes_final for tr in traces),
            "generated_kept": _share([k for tr in traces for k in tr.extra.get("decode_kept", [])]),
            "same_prefix": statistics.fmean(prefix(t.answer_ids, d.answer_ids) for t, d in zip(traces, dense)),
            "token_match": statistics.fmean(sum(x == y for x, y in zip(t.answer_ids, d.answer_ids))
                                            / max(1, len(d.answer_ids)) for t, d in zip(traces, dense)),
            "generated": statistics.fmean(len(tr.answer_ids) for tr in traces),
            "decode_tflops": statistics.fmean(tr.flops["decode"] for tr in traces) / 1e12,
            "decode_tflops_nocache": statistics.fmean(decode_without_cache(tr) for tr in traces) / 1e12,
            "decode_ms": statistics.median(tr.timings.get("decode_ms_per_token", float("nan")) for tr in traces),
            "prompts": len(traces)}
