"""Quantization as methods: weights (RTN, GPTQ, AWQ, MixLLM, SliM-LLM, SpQR), activations
(W8A8 / W4A4) and the KV cache (KIVI).

Weight methods act at the stage ``quantize_weights(wctx)``, once per (model, method): the
engine caches the result and swaps the de-quantized weights in for every run that names
the method ("fake quantization": the numbers a packed kernel would compute, in float).
``wctx`` (see ``mmlab/quantize.py``) offers the target linears in execution order grouped
by block, the calibration set, per-block Hessians / inputs / loss gradients, and
``wctx.set(name, weight, bits)`` which writes the quantized weight (later blocks calibrate
on quantized predecessors, as GPTQ's sequential pass does) and books its storage:
codes, scales, zeros and outliers, from which the effective bits per weight follow.

Conventions shared by every quantizer (GPTQ's ``Quantizer`` and torchao's affine mapping):
asymmetric: range [min(w, 0), max(w, 0)] over the group, ``scale = range / (2^b - 1)``,
integer zero point; symmetric: ``scale = 2 max|w| / (2^b - 1)``, codes ``-2^(b-1) .. 2^(b-1) - 1``.
A group is ``group_size`` consecutive input columns of one output row; ``None`` is one
group per output channel (per-channel). Scales are stored as fp16 and zeros at ``b`` bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from mmlab.methods.base import Method, MethodError, register

TARGETS = ("llm", "vision", "all")
CALIBRATION_DATA = ("mixed", "docstrings", "prose")  # the text sets of mmlab.data.calibration_windows
SCALE_BITS = 16  # one fp16 scale per group (and an fp16 value + 16-bit index per outlier)


# --- the quantizer ----------------------------------------------------------------------
def check_bits(name: str, bits, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise MethodError(f"{name}: {what} must be an integer in 1..8, got {bits!r}")


def check_group(name: str, group_size) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise MethodError(f"{name}: group_size must be a positive integer (e.g. 128) or None (per-channel), "
                          f"got {group_size!r}")


def qparams(w: torch.Tensor, bits, sym: bool):
    """Scale and zero point per row of ``w`` (rows, g) for ``bits`` (scalar or one per row)."""
    maxq = (2 ** torch.as_tensor(bits, device=w.device).float() - 1).reshape(-1, 1).expand(w.shape[0], 1)
    if sym:
        amax = w.abs().amax(1, keepdim=True)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / maxq
        zero = torch.floor((maxq + 1) / 2)
    else:
        lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
        same = hi == lo  # an all-zero group: any scale works
        lo, hi = torch.where(same, -torch.ones_like(lo), lo), torch.where(same, torch.ones_like(hi), hi)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale)
    return scale, zero, maxq


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor, *,
             divide: bool = False) -> torch.Tensor:
    """Round to the grid and back (the value a kernel de-quantizes to). RTN multiplies by the
    reciprocal, as torchao rounds (so our RTN and its kernels pick the same codes); ``divide``
    rounds ``w / scale`` as the official GPTQ / SpQR code does (the two differ at exact ties)."""
    x = w / scale if divide else w * (1.0 / scale)
    return scale * (torch.minimum(torch.clamp(torch.round(x) + zero, min=0), maxq) - zero)


def _groups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else cols // group_size


def per_group_bits(bits, rows: int, n_groups: int) -> torch.Tensor:
    """``bits`` (scalar, one per row, or (rows, groups)) as a (rows, groups) float tensor."""
    b = torch.as_tensor(bits, dtype=torch.float32)
    return b.reshape(-1, 1).expand(rows, n_groups) if b.dim() < 2 else b.float()


def rtn(w: torch.Tensor, bits, group_size: int | None, sym: bool) -> torch.Tensor:
    """Round-to-nearest of ``w`` (rows, cols); ``bits`` scalar, (rows,) or (rows, groups)."""
    rows, cols = w.shape
    n_groups = _groups(cols, group_size)
    b = per_group_bits(bits, rows, n_groups).reshape(-1)
    scale, zero, maxq = qparams(w.reshape(rows * n_groups, cols // n_groups), b, sym)
    return quantize(w.reshape(rows * n_groups, -1), scale, zero, maxq).reshape(rows, cols)


def stat_bits_per_group(bits: torch.Tensor, sym: bool) -> torch.Tensor:
    """Bits one group's statistics take: an fp16 scale, plus a ``bits``-wide zero if asymmetric."""
    return SCALE_BITS + (torch.zeros_like(bits) if sym else bits)


def storage_bits(bits, group_size: int | None, shape, sym: bool) -> float:
    """Bits held by a (rows, cols) weight: codes + per-group scales (and zeros)."""
    rows, cols = shape
    n_groups = _groups(cols, group_size)
    b = per_group_bits(bits, rows, n_groups)
    return float((b * (cols // n_groups) + stat_bits_per_group(b, sym)).sum())


# --- GPTQ ---------------------------------------------------------------------------------
def gptq(w: torch.Tensor, hessian: torch.Tensor, bits, group_size: int | None, sym: bool, *, damp: float = 0.01,
         block_size: int = 128, outlier_threshold: float | None = None, stat_bits: int | None = None):
    """GPTQ (Frantar et al., 2023): quantize columns left to right; push each column's
    error onto the not-yet-quantized columns through the inverse Hessian's Cholesky factor.

    ``bits``: scalar, (rows,) or (rows, groups). With ``outlier_threshold`` (SpQR, its official
    rule): tau = threshold x mean_j var(W[:, j]) / [H^-1 Cholesky]_jj^2 for the layer; a group's
    statistics are fitted with the weights whose leave-one-out error reduction exceeds tau replaced
    by the mean of the others in their row, and a weight whose scaled squared error
    ((w - q(w)) / [H^-1 Cholesky]_jj)^2 exceeds tau is kept exactly; with ``stat_bits`` the
    group scales and zeros are themselves quantized (asymmetric, per 16 rows). Returns the
    de-quantized weight, the number of outliers and the group statistics' bits.
    """
    w = w.clone().float()
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    bits_t = per_group_bits(bits, rows, cols // g)
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    tau = None if outlier_threshold is None else outlier_threshold * float((w.var(0) / hinv.diagonal() ** 2).mean())
    q = torch.zeros_like(w)
    outliers = torch.zeros_like(w, dtype=torch.bool)
    stat_total = 0.0
    scale = zero = maxq = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a new group: statistics from the current (error-updated) weights
                # GPTQ's code: W as updated by the previous blocks; SpQR's: as updated column by column
                grp = w[:, col:col + g] if tau is None else torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :g]
                b = bits_t[:, col // g]
                if tau is not None:  # likely outliers leave the group's statistics
                    grp = spqr_fit_group(grp, hinv.diagonal()[col:col + g], b, sym, tau)
                scale, zero, maxq = qparams(grp, b, sym)
                if stat_bits is not None:
                    scale, zero = _quantize_stats(scale, stat_bits), _quantize_stats(zero, stat_bits).round()
                stat_total += float(stat_bits_per_group(b, sym).sum()) if stat_bits is None else 0.0
            x, d = w1[:, i], hinv1[i, i]
            qx = quantize(x[:, None], scale, zero, maxq, divide=True)[:, 0]  # IST-DASLab/gptq quant.py
            if tau is not None:  # SpQR: a weight whose scaled error is above tau stays exact
                outliers[:, col] = ((x - qx) / d) ** 2 > tau
                qx = torch.where(outliers[:, col], x, qx)
            q[:, col] = qx
            e = (x - qx) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if stat_bits is not None:  # SpQR: 2 stats x stat_bits per group + fp16 second-level stats per 16 groups
        n_groups = rows * (cols // g)
        stat_total = n_groups * 2 * stat_bits + math.ceil(n_groups / 16) * 2 * 2 * SCALE_BITS
    return q, int(outliers.sum()), stat_total


def spqr_loo_reduction(grp: torch.Tensor, hinv_diag: torch.Tensor, bits, sym: bool) -> torch.Tensor:
    """SpQR's leave-one-out test (Vahe1994/SpQR ``get_leave_one_out_error``): per weight of a
    (rows, g) group, how much the row's scaled squared error sum_j ((w_j - q(w_j)) / d_j)^2 drops
    when the quantizer is fitted without that weight and the weight is not quantized."""
    rows, g = grp.shape
    idx = torch.arange(g)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).long()  # (g, g-1): every column but the j-th
    data = grp[:, loo].reshape(rows * g, g - 1)
    b = bits.repeat_interleave(g) if torch.is_tensor(bits) and bits.dim() else bits
    scale, zero, maxq = qparams(data, b, sym)
    rec = quantize(data, scale, zero, maxq, divide=True).reshape(rows, g, g - 1)
    loo_err = ((rec - grp[:, loo]) / hinv_diag[loo]).square().sum(-1)  # (rows, g)
    scale, zero, maxq = qparams(grp, bits, sym)
    base = ((quantize(grp, scale, zero, maxq, divide=True) - grp) / hinv_diag).square().sum(1, keepdim=True)
    return base - loo_err


def spqr_fit_group(grp: torch.Tensor, hinv_diag: torch.Tensor, bits, sym: bool, tau: float) -> torch.Tensor:
    """The weights SpQR fits a group's statistics on: likely outliers (leave-one-out reduction
    above ``tau``) replaced by the mean of the row's other weights."""
    likely = spqr_loo_reduction(grp, hinv_diag, bits, sym) > tau
    keep = (~likely).float()
    mean = (grp * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    return torch.where(likely, mean, grp)


def _quantize_stats(stat: torch.Tensor, stat_bits: int) -> torch.Tensor:
    """SpQR's second level: a (rows, 1) column of group statistics, quantized per 16 rows."""
    rows = stat.shape[0]
    pad = (-rows) % 16
    x = torch.cat([stat[:, 0], stat[-1:, 0].expand(pad)]).reshape(-1, 16)
    s, z, m = qparams(x, stat_bits, sym=False)
    return quantize(x, s, z, m, divide=True).reshape(-1)[:rows, None]


# --- the method classes -------------------------------------------------------------------
@dataclass
class WeightQuant(Method):
    """Shared parts of the weight quantizers: bits, group size, symmetry, which linears; their checks."""

    family: ClassVar[str] = "quantization"
    knob: ClassVar[str] = "bits"
    quantizes_weights: ClassVar[bool] = True
    bits: int = 4
    group_size: int | None = 128  # None: one group per output channel
    sym: bool = False
    targets: str = "llm"  # llm | vision | all, or () for none

    def check(self) -> None:
        if self.targets not in TARGETS and self.targets != ():
            raise MethodError(f"{self.name}: targets must be one of {', '.join(TARGETS)} (or () for none), "
                              f"got {self.targets!r}")
        check_bits(self.name, self.bits)
        check_group(self.name, self.group_size)

    def for_model(self, wctx) -> "WeightQuant":
        """The paper's group of 128 does not divide every model's widths (SmolLM2: 576): take the
        largest power-of-two group <= ``group_size`` (>= 32) that divides every target linear's
        in_features, noted as ``group_size`` in the result (``QuantizedWeights.summary``)."""
        cols = {m.weight.shape[1] for m in wctx.linears.values()}
        if self.group_size is None or all(c % self.group_size == 0 for c in cols):
            return self
        g = 1 << (self.group_size.bit_length() - 1)
        while g >= 32 and any(c % g for c in cols):
            g //= 2
        if g < 32:
            return self  # check_shapes says what is valid
        wctx.note("*", group_size=g, group_size_asked=self.group_size)
        return replace(self, group_size=g)

    def check_shapes(self, wctx) -> None:
        for name, mod in wctx.linears.items():
            cols = mod.weight.shape[1]
            if self.group_size is not None and cols % self.group_size:
                ok = [g for g in (32, 64, 128, 192, 256)
                      if all(m.weight.shape[1] % g == 0 for m in wctx.linears.values())]
                raise MethodError(f"{self.name}: group_size {self.group_size} does not divide in_features {cols} of "
                                  f"{name}; valid here: {', '.join(map(str, ok)) or 'none of 32..256'} or None "
                                  f"(per-channel)")


@dataclass
class Calibrated:
    """Calibration data of a quantizer: ``calib_samples`` x ``calib_len`` tokens of ``calib_data``
    (``mixed``: random windows of the offline corpus's second half and the Python language
    reference; ``docstrings``: the offline corpus's tail) for text LMs, training-split image
    questions for VLMs; never the text perplexity is measured on."""

    calib_samples: int = 64
    calib_len: int = 512
    calib_data: str = "mixed"

    def calibration(self, wctx):
        return wctx.calibration(self.calib_samples, self.calib_len, self.calib_data)

    def check_calibration(self) -> None:
        if isinstance(self.calib_samples, bool) or not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise MethodError(f"{self.name} needs calibration data: calib_samples must be >= 1 "
                              f"(e.g. 64 windows of 512 tokens), got {self.calib_samples!r}")
        if self.calib_data not in CALIBRATION_DATA:
            raise MethodError(f"{self.name}: calib_data must be one of {', '.join(CALIBRATION_DATA)}, "
                              f"got {self.calib_data!r}")


@dataclass
class CalibratedQuant(Calibrated, WeightQuant):
    """A weight quantizer that reads calibration data (see ``Calibrated``)."""

    def check(self) -> None:
        super().check()
        self.check_calibration()


@register
@dataclass
class RTN(WeightQuant):
    """Round-to-nearest weight quantization, the baseline of the low-bit LLaMA3 study
    (Huang et al., 2024): every group of ``group_size`` input weights of a row is mapped
    independently to ``bits``-bit integers with its own scale (and zero if asymmetric)."""

    name: ClassVar[str] = "rtn"

    def quantize_weights(self, wctx) -> None:
        self.check_shapes(wctx)
        for name, mod in wctx.linears.items():
            w = mod.weight.float()
            wctx.set(name, rtn(w, self.bits, self.group_size, self.sym),
                     storage_bits(self.bits, self.group_size, w.shape, self.sym))


@register
@dataclass
class GPTQ(CalibratedQuant):
    """GPTQ (Frantar et al., ICLR 2023): per layer, minimise ||WX - Q(W)X||^2 column by
    column, compensating each column's rounding error on the remaining columns through the
    inverse Hessian H = 2XX^T of the layer's calibration inputs (blocks quantized in order,
    each calibrated on its quantized predecessors). Defaults: damp 0.01, 128-column blocks;
    the paper calibrates on 128 x 2048 tokens of C4, we on ``calib_samples`` x ``calib_len``
    tokens of the offline corpus (the text LM) or of training-split shapes prompts."""

    name: ClassVar[str] = "gptq"
    damp: float = 0.01

    def quantize_weights(self, wctx) -> None:
        self.check_shapes(wctx)
        self.run_gptq(wctx, lambda name, hessian: self.bits)

    def run_gptq(self, wctx, bits_of) -> None:
        """Block by block: Hessians from the calibration set on the (partly quantized) model,
        then GPTQ on each linear with ``bits_of(name, hessian)`` bits (scalar, per row or per group)."""
        calib = self.calibration(wctx)
        for block in wctx.blocks:
            hessians = wctx.hessians(block, calib)
            for name in block:
                w = wctx.linears[name].weight.float()
                n_groups = _groups(w.shape[1], self.group_size)
                bits = per_group_bits(bits_of(name, hessians[name]), w.shape[0], n_groups)
                q, n_out, stat = gptq(w, hessians[name], bits, self.group_size, self.sym, damp=self.damp,
                                      **self.extra_gptq())
                codes = float(bits.sum()) * (w.shape[1] // n_groups)
                wctx.set(name, q, codes + stat + n_out * 2 * SCALE_BITS, outliers=n_out)

    def extra_gptq(self) -> dict:
        return {}


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scales for one grid point (mit-han-lab/llm-awq, auto_scale.py):
    mean|x|^alpha, floored at 1e-4, divided by sqrt(max * min) so they straddle 1."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@register
@dataclass
class AWQ(CalibratedQuant):
    """AWQ (Lin et al., MLSys 2024): protect salient input channels by scaling them up
    before quantization, s = mean|x|^alpha (normalised), with alpha grid-searched per group of
    linears sharing an input to minimise the output error; the scale is folded back
    (Q(W diag s) diag s^-1). Then (``clip``) the per-group clipping range is searched too.
    Every layer searches on the full-precision model's activations (llm-awq ``run_awq``)."""

    name: ClassVar[str] = "awq"
    grid: int = 20
    clip: bool = True

    def quantize_weights(self, wctx) -> None:
        self.check_shapes(wctx)
        calib = self.calibration(wctx)
        done = {}  # written at the end: every block searches on full-precision inputs, as AWQ's run_awq
        for block in wctx.blocks:  # (which takes a layer's outputs before its scales and clips are applied)
            inputs = wctx.inputs(block, calib, max_tokens=2048)  # shared by every AWQ config of the model
            for names in _shared_input_groups(block, inputs):
                x = inputs[names[0]]
                ws = [wctx.linears[n].weight.float() for n in names]
                s = self.search_scale(x, ws)
                for n, w in zip(names, ws):
                    clip = self.clip and not any(k in n for k in ("q_proj", "k_proj"))  # AWQ skips q/k
                    done[n] = self.quantize_scaled(w * s, x / s, clip) / s
        for n, wq in done.items():
            wctx.set(n, wq, storage_bits(self.bits, self.group_size, wq.shape, self.sym))

    def search_scale(self, x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        """The alpha of the grid whose scales give the lowest output error mean((x dW^T)^2), summed over
        the group's linears. The error is read off the inputs' Gram matrix, tr(dW X^T X dW^T) / (N out),
        which is the same quantity at in/N of the cost of forming x dW^T."""
        x_mean = x.abs().mean(0)
        gram = x.T @ x
        best, best_s = float("inf"), torch.ones_like(x_mean)
        for k in range(self.grid):
            s = awq_scales(x_mean, k / self.grid)
            err = 0.0
            for w in ws:
                dw = rtn(w * s, self.bits, self.group_size, self.sym) / s - w
                err += float(((dw @ gram) * dw).sum()) / (x.shape[0] * w.shape[0])
            if err < best:
                best, best_s = err, s
        return best_s

    def quantize_scaled(self, w: torch.Tensor, x: torch.Tensor, clip: bool) -> torch.Tensor:
        """RTN of the scaled weight, with AWQ's clipping search (shrink each group's range)."""
        if not clip:
            return rtn(w, self.bits, self.group_size, self.sym)
        rows, cols = w.shape
        g = cols if self.group_size is None else self.group_size
        wg = w.reshape(rows, cols // g, g)
        xg = x[:: max(1, x.shape[0] // 512)].reshape(-1, cols // g, g)  # a token subsample, as AWQ does
        ref = torch.einsum("rgk,tgk->rgt", wg, xg)
        best_err = torch.full((rows, cols // g), float("inf"))
        best = wg
        for k in range(self.grid // 2):  # shrink the max by up to 50%, AWQ's auto_clip range
            ratio = 1 - k / self.grid
            m = wg.abs().amax(-1, keepdim=True) * ratio  # AWQ clamps to +-max|w| * ratio
            wc = torch.maximum(torch.minimum(wg, m), -m)
            wq = rtn(wc.reshape(rows, cols), self.bits, self.group_size, self.sym).reshape(rows, cols // g, g)
            err = (torch.einsum("rgk,tgk->rgt", wq, xg) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], wq, best)
        return best.reshape(rows, cols)


def _shared_input_groups(block: list[str], inputs: dict) -> list[list[str]]:
    """Linears of a block that read the same input tensor (q/k/v, gate/up) form one AWQ group."""
    groups: list[list[str]] = []
    for n in block:
        for grp in groups:
            if inputs[grp[0]] is inputs[n]:
                grp.append(n)
                break
        else:
            groups.append([n])
    return groups


@register
@dataclass
class SliM(GPTQ):
    """SliM-LLM (Huang et al., ICML 2025): salience-driven group bit allocation (SBA) on top of
    GPTQ. A column group's salience is sum w^2 / U_jj^2 (U: the upper Cholesky factor of H^-1, as
    GPTQ uses it); the k most salient groups get ``bits + 1``, the k least salient ``bits - 1``
    (average stays ``bits``). k in 1 .. groups/2 - 1 minimises, per layer, ``criterion``: ``kl``
    (the official code's: KL(softmax(X Q(W)^T) || softmax(X W^T)) over output channels, mean over
    calibration tokens, X the layer's inputs on the partly quantized model) or ``hessian`` (the
    output error tr(dW H dW^T))."""

    name: ClassVar[str] = "slim"
    bits: int = 2
    criterion: str = "kl"

    def check(self) -> None:
        super().check()
        if self.criterion not in ("kl", "hessian"):
            raise MethodError(f"slim: criterion must be kl (the official search) or hessian, got {self.criterion!r}")

    def quantize_weights(self, wctx) -> None:
        self.check_shapes(wctx)
        calib, inputs = self.calibration(wctx), {}

        def bits_of(name, hessian):
            if self.criterion == "kl" and name not in inputs:  # one forward per block, on its current inputs
                block = next(b for b in wctx.blocks if name in b)
                inputs.clear()
                inputs.update(wctx.current_inputs(block, calib))
            return self.allocate(wctx, name, hessian, inputs.get(name))
        self.run_gptq(wctx, bits_of)

    def allocate(self, wctx, name, hessian, x=None):
        w = wctx.linears[name].weight.float()
        rows, cols = w.shape
        g = cols if self.group_size is None else self.group_size
        n_groups = cols // g
        h = hessian + self.damp * hessian.diagonal().mean() * torch.eye(cols)
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).diagonal()
        order = slim_salience(w, u, g).argsort(descending=True)
        best, best_bits = float("inf"), None
        out = x @ w.T if self.criterion == "kl" else None  # the layer's full-precision output, once
        for k in range(1, max(2, n_groups // 2)):
            b = torch.full((n_groups,), self.bits)
            b[order[:k]] = min(8, self.bits + 1)
            b[order[n_groups - k:]] = max(1, self.bits - 1)
            wq = rtn(w, b.expand(rows, -1), self.group_size, self.sym)
            err = slim_kl(x @ wq.T, out) if self.criterion == "kl" else float((((w - wq) @ h) * (w - wq)).sum())
            if err < best:
                best, best_bits = err, b
        wctx.note(name, group_bits=best_bits.tolist())
        return best_bits.expand(rows, -1)


def slim_salience(w: torch.Tensor, u_diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """SliM-LLM's group salience (Aaronhuang-778/SliM-LLM ``slim_gptq.py``): sum over a group's
    columns of w^2 / U_jj^2, U the upper Cholesky factor of the damped H^-1."""
    return (w.pow(2) / u_diag.pow(2)[None, :]).sum(0).reshape(-1, group_size).sum(1)


def slim_kl(quantized: torch.Tensor, original: torch.Tensor) -> float:
    """The official search's criterion (``utils/reconstruct.py`` ``kl_div``): softmax over output
    channels, both clamped at 1e-6, sum p_q (log p_q - log p_o), mean over rows."""
    p_q = quantized.softmax(-1).clamp(min=1e-6)
    p_o = original.softmax(-1).clamp(min=1e-6)
    return float((p_q * (p_q.log() - p_o.log())).sum(-1).mean())


@register
@dataclass
class SpQR(GPTQ):
    """SpQR (Dettmers et al., ICLR 2024): GPTQ with small groups (16) whose scales and zeros
    are themselves quantized (3 bits, per 16 groups), plus unstructured outliers kept in fp16
    (value + 16-bit index): weights whose scaled squared error exceeds ``outlier_threshold``
    times the layer's mean var(W[:, j]) / [H^-1 Cholesky]_jj^2 (the official rule and its README's
    threshold 0.2; see ``gptq``)."""

    name: ClassVar[str] = "spqr"
    bits: int = 3
    group_size: int | None = 16
    stat_bits: int = 3
    outlier_threshold: float = 0.2

    def check(self) -> None:
        super().check()
        check_bits(self.name, self.stat_bits, "stat_bits")
        if not self.outlier_threshold > 0:
            raise MethodError(f"{self.name}: outlier_threshold must be > 0 (inf keeps no outliers), "
                              f"got {self.outlier_threshold!r}")

    def extra_gptq(self) -> dict:
        return {"outlier_threshold": None if math.isinf(self.outlier_threshold) else self.outlier_threshold,
                "stat_bits": self.stat_bits}


@register
@dataclass
class MixLLM(GPTQ):
    """MixLLM (Zheng et al., 2024): mixed precision between output channels, chosen
    globally. An output channel's salience is |sum_j g*dw + (g*dw)^2 / 2| (g: gradient of the
    calibration loss, dw: its low-bit quantization error); the top ``high_fraction`` of all
    channels of all target layers get ``high_bits``, the rest ``bits`` (W4.4 at 10%)."""

    name: ClassVar[str] = "mixllm"
    high_bits: int = 8
    high_fraction: float = 0.1

    def check(self) -> None:
        super().check()
        check_bits(self.name, self.high_bits, "high_bits")
        if not 0 <= self.high_fraction <= 1:
            raise MethodError(f"{self.name}: high_fraction must be in [0, 1], got {self.high_fraction!r}")

    def quantize_weights(self, wctx) -> None:
        self.check_shapes(wctx)
        grads = wctx.gradients(self.calibration(wctx))
        salience = {}
        for name, mod in wctx.linears.items():
            w = mod.weight.float()
            gdw = grads[name] * (rtn(w, self.bits, self.group_size, self.sym) - w)
            salience[name] = (gdw + 0.5 * gdw ** 2).sum(1).abs()
        allsal = torch.cat(list(salience.values()))
        n_high = int(round(self.high_fraction * allsal.numel()))
        cut = allsal.topk(n_high).values[-1] if n_high else float("inf")
        high = {n: s >= cut for n, s in salience.items()}
        for n, h in high.items():
            wctx.note(n, high_channels=int(h.sum()))
        self.run_gptq(wctx, lambda name, hessian: torch.where(high[name], self.high_bits, self.bits))


@register
@dataclass
class ActQuant(RTN):
    """Weight-activation integer quantization (W8A8 / W4A4, "Give me BF16 or give me
    death", Kurtic et al., 2024): weights per output channel (symmetric, RTN), activations
    fake-quantized per token, dynamically (symmetric), at the input of every target linear."""

    name: ClassVar[str] = "act_quant"
    bits: int = 8  # weight bits
    group_size: int | None = None
    sym: bool = True
    act_bits: int = 8

    def check(self) -> None:
        super().check()
        check_bits(self.name, self.act_bits, "act_bits")

    def quantize_activation(self, x: torch.Tensor, state=None) -> torch.Tensor:
        return per_token(x, self.act_bits)


def per_token(x: torch.Tensor, bits) -> torch.Tensor:
    """Per-token symmetric fake quantization, on the same grid as the weights (and torchao):
    scale = 2 max|x| / (2^b - 1), codes -2^(b-1) .. 2^(b-1) - 1."""
    flat = x.reshape(-1, x.shape[-1]).float()
    scale, zero, maxq = qparams(flat, bits, sym=True)
    return quantize(flat, scale, zero, maxq).reshape(x.shape).to(x.dtype)


@register
@dataclass
class ActivationQuant(Method):
    """Activation quantization alone: per-token dynamic symmetric fake quantization (``act_bits``)
    at the input of every target linear, composable with any weight method and KV quantizer in one
    run, e.g. W4A4KV4 = ``gptq(bits=4)+act(act_bits=4)+kivi(bits=4)`` (COMET's setting)."""

    name: ClassVar[str] = "act"
    family: ClassVar[str] = "quantization"
    knob: ClassVar[str] = "act_bits"
    act_bits: int = 8
    targets: str = "llm"

    def check(self) -> None:
        check_bits(self.name, self.act_bits, "act_bits")

    def quantize_activation(self, x: torch.Tensor, state=None) -> torch.Tensor:
        return per_token(x, self.act_bits)


def fmpq_order(absmax: torch.Tensor, block_size: int, high_fraction: float) -> tuple[torch.Tensor, int]:
    """COMET's channel permutation: the ``ceil(high_fraction x blocks)`` blocks' worth of channels
    with the largest calibration max |x| first (largest first), then the others in their order.
    Returns (permutation, number of leading channels kept at high precision)."""
    c = absmax.numel()
    n_high = min(c, math.ceil(round(high_fraction * math.ceil(c / block_size), 9)) * block_size)
    top = torch.argsort(absmax, descending=True, stable=True)[:n_high]
    rest = torch.ones(c, dtype=torch.bool)
    rest[top] = False
    return torch.cat([top, rest.nonzero().flatten()]), n_high


def per_token_blocks(x: torch.Tensor, block_size: int, bits: int) -> torch.Tensor:
    """Per-token symmetric quantization with one scale per ``block_size`` channels (the last block
    may be shorter)."""
    return torch.cat([per_token(b, bits) for b in x.split(block_size, dim=-1)], dim=-1)


@register
@dataclass
class FMPQ(Calibrated, ActivationQuant):
    """COMET's fine-grained mixed-precision activation quantization (FMPQ; Liu et al., "COMET:
    Towards Practical W4A4KV4 LLMs Serving", ASPLOS 2025, Sec. 3.2): each linear's input channels
    are cut into blocks of ``block_size``; the outlier channels, located on calibration activations,
    are permuted into as few blocks as possible, quantized at ``high_bits`` (INT8), every other
    block at ``act_bits`` (INT4); per token and block, dynamic, symmetric. The paper names no
    outlier threshold: we keep the channels with the largest calibration max |x| in
    ``ceil(high_fraction x blocks)`` blocks, ``high_fraction`` = 0.16 its reported average share
    of 8-bit activations. Compose with weights and KV, e.g. ``gptq(bits=4)+fmpq+kivi(bits=4)``."""

    name: ClassVar[str] = "fmpq"
    knob: ClassVar[str] = "high_fraction"
    act_bits: int = 4
    high_bits: int = 8
    block_size: int = 128  # the paper's k: a multiple of the tensor cores' k granularity
    high_fraction: float = 0.16

    def check(self) -> None:
        check_bits(self.name, self.act_bits, "act_bits")
        check_bits(self.name, self.high_bits, "high_bits")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise MethodError(f"{self.name}: block_size must be a positive integer (the paper: 128), "
                              f"got {self.block_size!r}")
        if not isinstance(self.high_fraction, (int, float)) or not 0 <= self.high_fraction <= 1:
            raise MethodError(f"{self.name}: high_fraction must be in [0, 1] (the share of channel blocks "
                              f"kept at high_bits), got {self.high_fraction!r}")
        self.check_calibration()

    def calibrate_activations(self, wctx) -> dict[str, tuple[torch.Tensor, int]]:
        absmax = wctx.input_absmax(self.calibration(wctx))
        orders = {n: fmpq_order(a, self.block_size, self.high_fraction) for n, a in absmax.items()}
        return {n: (perm, torch.argsort(perm), n_high) for n, (perm, n_high) in orders.items()}

    def quantize_activation(self, x: torch.Tensor, state=None) -> torch.Tensor:
        perm, inverse, n_high = state  # (in_features,) permutation (outlier channels first), its inverse
        xp = x[..., perm]
        parts = [(xp[..., :n_high], self.high_bits), (xp[..., n_high:], self.act_bits)]
        q = torch.cat([per_token_blocks(p, self.block_size, b) for p, b in parts if p.shape[-1]], dim=-1)
        return q[..., inverse]


# --- KV cache -----------------------------------------------------------------------------
def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in 0..2^bits-1 packed 8 / bits to a byte (uint8): what is really held."""
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)]).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.uint8, device=codes.device) * bits
    return (flat << shifts).sum(1, dtype=torch.uint8) if per > 1 else flat[:, 0]


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    return ((packed[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:n]


class _Packed:
    """Asymmetric codes of ``x`` grouped along its last dim: packed codes + fp16 scale and minimum."""

    def __init__(self, x: torch.Tensor, bits: int, group: int):
        self.shape, self.bits, self.dtype = x.shape, bits, x.dtype
        g = min(group, x.shape[-1])
        pad = (-x.shape[-1]) % g
        xg = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1) if pad else x
        xg = xg.reshape(*x.shape[:-1], -1, g)
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-8)
        codes = torch.clamp(torch.round((xg - lo) / scale), 0, 2 ** bits - 1)
        self.n_codes = codes.numel()
        self.codes, self.scale, self.lo = _pack(codes, bits), scale.half(), lo.half()
        self.grouped_shape = xg.shape

    def dequantize(self) -> torch.Tensor:
        codes = _unpack(self.codes, self.bits, self.n_codes).reshape(self.grouped_shape)
        x = codes.to(self.dtype) * self.scale.to(self.dtype) + self.lo.to(self.dtype)
        return x.reshape(*self.grouped_shape[:-2], -1)[..., : self.shape[-1]]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.lo))


class QuantizedKV:
    """One layer's quantized KV prefix, KIVI's layout: keys per channel (groups of tokens) and values
    per token (groups of channels), appended chunk by chunk. Keys and values are quantized on their
    own schedules (KIVI's), so the prefix may hold more keys than values; ``keys[i]`` / ``values[i]``
    then hold the rest of each in full precision, and both sides always add up to the same length."""

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size
        self.key_chunks, self.value_chunks, self.key_length, self.value_length = [], [], 0, 0

    @property
    def length(self) -> int:
        """Tokens whose keys are quantized (the cache's lengths() count keys)."""
        return self.key_length

    def append_keys(self, k: torch.Tensor) -> None:
        # keys (1, h, n, d): quantize along tokens for each channel -> group the transposed tensor
        self.key_chunks.append(_Packed(k.transpose(-1, -2), self.bits, self.group_size))
        self.key_length += k.shape[-2]

    def append_values(self, v: torch.Tensor) -> None:
        self.value_chunks.append(_Packed(v, self.bits, self.group_size))
        self.value_length += v.shape[-2]

    def dequantize(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ks = [c.dequantize().transpose(-1, -2) for c in self.key_chunks]
        vs = [c.dequantize() for c in self.value_chunks]
        return (torch.cat(ks, -2) if ks else None), (torch.cat(vs, -2) if vs else None)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.key_chunks + self.value_chunks)


@register
@dataclass
class KIVI(Method):
    """KIVI (Liu et al., ICML 2024): asymmetric KV-cache quantization, keys per channel (groups of
    ``group_size`` tokens), values per token (groups of ``group_size`` channels), codes packed into
    bytes with fp16 scales and minima. Full-precision window as the official code
    (jy-yuan/KIVI, ``models/llama_kivi.py``): after the prefill of n tokens, keys are quantized up to
    n - n % R (the last n % R stay full precision: none when R divides n) and exactly the last R values
    stay full precision; while decoding, the full-precision keys are quantized together once R have
    gathered, and values one token at a time once more than R are held (R = ``residual``)."""

    name: ClassVar[str] = "kivi"
    family: ClassVar[str] = "quantization"
    knob: ClassVar[str] = "bits"
    quantizes_cache: ClassVar[bool] = True
    bits: int = 2
    group_size: int = 32
    residual: int = 128

    def check(self) -> None:
        if self.bits not in (1, 2, 4, 8):
            raise MethodError(f"{self.name}: bits must be one of 1, 2, 4, 8 (codes are packed into bytes), "
                              f"got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise MethodError(f"{self.name}: group_size must be a positive integer (e.g. 32), got {self.group_size!r}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise MethodError(f"{self.name}: residual (full-precision recent tokens) must be an integer >= 0, "
                              f"got {self.residual!r}")

    def full_precision(self, n_keys: int, n_values: int) -> tuple[int, int]:
        """How many of the oldest full-precision keys / values to quantize now (KIVI's rule)."""
        r = self.residual
        return (n_keys if r == 0 else n_keys - n_keys % r), max(0, n_values - r)

    def _quantize(self, cache) -> None:
        for layer, k in enumerate(cache.keys):
            if k is None:
                continue
            v = cache.values[layer]
            n_k, n_v = self.full_precision(k.shape[-2], v.shape[-2])
            if n_k <= 0 and n_v <= 0:
                continue
            if cache.quantized[layer] is None:
                cache.quantized[layer] = QuantizedKV(self.bits, self.group_size)
            q = cache.quantized[layer]
            if n_k > 0:
                q.append_keys(k[:, :, :n_k])
                cache.keys[layer] = k[:, :, n_k:].contiguous()
            if n_v > 0:  # per-token groups: a chunk of tokens gives the codes of one token at a time
                q.append_values(v[:, :, :n_v])
                cache.values[layer] = v[:, :, n_v:].contiguous()

    def after_prefill(self, ctx, cache) -> None:
        self._quantize(cache)
        ctx.trace.extra["kv_quantized"] = {  # layer -> (oldest keys, oldest values) held quantized after prefill
            i: (q.key_length, q.value_length) for i, q in enumerate(cache.quantized) if q is not None}

    def decode_step(self, ctx, step: int, cache) -> None:
        self._quantize(cache)
