"""The explorer of ``notebooks/05_explorer.ipynb``: one sample, run A beside run B, every family.

Pick a sample, a method (only those that can run on the loaded model are offered) with its own
knob and parameters, and a second run to compare with (a method spec, ``none`` by default). The
view follows run A's family and reads everything from the Traces:

- visual-token pruning: kept / removed / merged tokens of each run on the image, their difference,
  the last prompt token's attention over the image (one colour scale for both runs), tokens per layer;
- KV cache: the prompt coloured by what the method did to each token in the chosen layer and KV head
  (kept, evicted, merged into which token: hover, quantized), the attention that scored them, cache
  length per layer and bytes;
- Mixture-of-Depths: routed vs skipped visual tokens, the trained routers' weights, the schedule;
- quantization: per module, the weight error (histogram, per-group map on one colour scale),
  SliM-LLM's bits per group, and every module's output error on the sample.

Timings are medians of warm repeats (the first run of a configuration is excluded) and are marked
noisy when their spread is large. An error shows as one line in the widget and clears the view.
"""

from __future__ import annotations

import statistics
from html import escape

import numpy as np

from mmlab import figures, viz
from mmlab.evaluate import run
from mmlab.methods import MethodError, as_methods, available, defaults, method_class, spec
from mmlab.quantize import quantized_weights
from mmlab.trace import Trace

FAMILIES = ("token_pruning", "mod", "kv_cache", "quantization")  # a composition shows its first in this order
NOISY = 0.3  # (max - min) / median of the warm timings above which they are marked noisy


def family(methods) -> str:
    """The view a run's methods get: the first of ``FAMILIES`` among them (``none`` for no method)."""
    found = {m.family for m in methods}
    return next((f for f in FAMILIES if f in found), "none")


class Explorer:
    """Runs cached by (sample, spec, layer): moving the head slider or switching views only redraws."""

    def __init__(self, bundle, samples, methods: list[str] | None = None, repeats: int = 2):
        self.bundle, self.samples, self.repeats = bundle, samples, repeats
        self.method_names = methods or self.runnable()
        self._traces: dict = {}
        self._timings: dict = {}
        self.runs = 0  # engine runs performed (the cache's effect is visible here)
        self.last = None  # (figure, provenance) of the latest view, for export

    # --- what can run here ----------------------------------------------------------------------
    def runnable(self) -> list[str]:
        """Registered methods this model can run: visual methods need a multimodal model, a method
        that ``requires`` checkpoint extras (trained routers) needs a checkpoint that carries them."""
        out = []
        for name in available():
            cls = method_class(name)
            if (cls.needs_image and not self.bundle.multimodal) or any(r not in self.bundle.extras
                                                                       for r in cls.requires):
                continue
            out.append(name)
        return out

    @staticmethod
    def controls(name: str) -> tuple[str | None, dict]:
        """The method's knob (a slider) and its other parameters with their defaults (a text field)."""
        params = defaults(name)
        k = method_class(name).knob
        return k, {p: v for p, v in params.items() if p != k}

    @staticmethod
    def spec(name: str, knob_value=None, others: str = "") -> str:
        """A spec string from the controls: ``name(knob=value, others)``; validated by parsing it."""
        if name == "none":
            return "none"
        k = method_class(name).knob
        args = ([f"{k}={knob_value!r}"] if k and knob_value is not None else []) + ([others] if others.strip() else [])
        text = f"{name}({', '.join(args)})"
        return spec(as_methods(text))  # raises a one-line MethodError on a bad value

    # --- runs -------------------------------------------------------------------------------------
    def trace(self, index: int, spec_text: str, layer: int | None = None) -> Trace:
        """The run of ``spec_text`` on sample ``index``, with attention recorded for ``layer``."""
        key = (index, spec_text, layer)
        if key not in self._traces:
            methods = as_methods(spec_text)
            layers = [] if layer is None else [layer]
            self._traces[key] = run(self.bundle, self.samples[index], methods, attention_layers=layers)
            self.runs += 1
        return self._traces[key]

    def timing(self, index: int, spec_text: str) -> dict:
        """Warm prefill timings: ``repeats`` runs after one excluded cold run; median and spread."""
        key = (index, spec_text)
        if key not in self._timings:
            methods = as_methods(spec_text)
            ms = [run(self.bundle, self.samples[index], methods).timings["prefill_ms"] for _ in range(1 + self.repeats)]
            warm = ms[1:]
            self.runs += len(ms)
            med = statistics.median(warm)
            spread = (max(warm) - min(warm)) / med if med else 0.0
            self._timings[key] = {"prefill_ms": med, "spread": spread, "noisy": spread > NOISY}
        return self._timings[key]

    # --- the view ---------------------------------------------------------------------------------
    def view(self, index: int, spec_a: str, spec_b: str = "none", layer: int = 0, head: int | None = None,
             module: str | None = None):
        """(figure, HTML) of run A beside run B in A's family view."""
        fam = family(as_methods(spec_a))
        draw = {"kv_cache": self._kv, "mod": self._mod, "quantization": self._quant}.get(fam, self._pruning)
        fig, html = draw(index, spec_a, spec_b, layer, head, module)
        self.last = (fig, {"model": self.bundle.name, "sample": index, "A": spec_a, "B": spec_b, "layer": layer,
                           "head": head, "module": module, "view": fam})
        return fig, self._summary(index, {"A": spec_a, "B": spec_b}, layer) + html

    def _summary(self, index: int, specs: dict, layer: int) -> str:
        s = self.samples[index]
        rows = []
        for label, sp in specs.items():
            tr, t = self.trace(index, sp, layer), self.timing(index, sp)
            note = " (one warm run)" if self.repeats < 2 else " (noisy)" if t["noisy"] else ""
            ms = f"{t['prefill_ms']:.1f}{note}"
            rows.append(f"<tr><td>{label}</td><td>{escape(sp)}</td><td class='mmlab-answer-{label}'>{escape(tr.answer)}"
                        f"</td>"
                        f"<td>{tr.flops['prefill'] / 1e9:.3f}</td><td>{tr.kv_bytes / 1024:.1f}</td><td>{ms}</td></tr>")
        question = getattr(s, "question", None) or getattr(s, "qtype", "")
        truth = getattr(s, "answer", "")
        return (f"<div><b>Q:</b> {escape(str(question))} &nbsp; <b>truth:</b> {escape(str(truth))} &nbsp; "
                f"<b class='mmlab-answer'>A: {escape(self.trace(index, specs['A'], layer).answer)}</b></div>"
                "<table><tr><th>run</th><th>methods</th><th>answer</th><th>prefill GFLOPs</th><th>KV KiB</th>"
                "<th>prefill ms (warm median)</th></tr>" + "".join(rows) + "</table>")

    def _image(self, index: int):
        s = self.samples[index]
        img = getattr(s, "image", None) or (getattr(s, "images", None) or [None])[-1]
        if img is None:
            raise MethodError("this sample has no image to draw the view on")
        return img

    def _pruning(self, index, spec_a, spec_b, layer, head, module):
        import matplotlib.pyplot as plt

        a, b = self.trace(index, spec_a, layer), self.trace(index, spec_b, layer)
        img = self._image(index)
        fig, axes = plt.subplots(2, 3, figsize=(12, 7))
        if a.image_grid is None:
            raise MethodError(f"{self.bundle.name} has no 2-D visual-token grid to draw on")
        sa, sb = viz.token_status(a, layer), viz.token_status(b, layer)
        viz.draw_status(img, sa, a.image_grid, axes[0, 0], f"A at layer {layer}: {int((sa == 1).sum())} tokens")
        viz.draw_status(img, sb, b.image_grid, axes[0, 1], f"B at layer {layer}: {int((sb == 1).sum())} tokens")
        viz.draw_kept_diff(img, sa == 1, sb == 1, a.image_grid, axes[0, 2])
        grids = [viz.attention_grid(t, layer, head) for t in (a, b)]
        vmax = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for g in grids) or 1.0
        for ax, g, label in zip(axes[1, :2], grids, "AB"):
            viz.draw_attention_grid(img, g, ax, vmax, f"{label}: layer {layer}, "
                                                      f"{'mean of heads' if head is None else f'head {head}'}")
        viz.plot_tokens_per_layer({"A": a, "B": b}, axes[1, 2])
        fig.tight_layout()
        return fig, ""

    def _mod(self, index, spec_a, spec_b, layer, head, module):
        import matplotlib.pyplot as plt

        a, b = self.trace(index, spec_a, layer), self.trace(index, spec_b, layer)
        img = self._image(index)
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        routed = viz.token_status(a, layer)  # 1: processed by this layer, 0: skipped (rode the residual)
        viz.draw_status(img, routed, a.image_grid, axes[0], f"A, layer {layer}: {int(routed.sum())} routed",
                        present="routed", absent="skipped")
        viz.draw_router_weights(a, img, layer, axes[1])
        n_img = max(1, int((a.modality >= 0).sum()))
        for label, t in (("A", a), ("B", b)):
            axes[2].plot(np.array(t.image_tokens_per_layer()) / n_img, marker="o", label=label)
        axes[2].set(xlabel="decoder layer", ylabel="share of visual tokens processed", ylim=(0, 1.05),
                    title="the schedule as executed")
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        return fig, ""

    def _kv(self, index, spec_a, spec_b, layer, head, module):
        import matplotlib.pyplot as plt

        head = head or 0
        a, b = self.trace(index, spec_a, layer), self.trace(index, spec_b, layer)
        ids = self.bundle.encode(self.samples[index]).input_ids[0].tolist()
        pieces = self._pieces(ids, a)
        html, kept = [], {}
        for label, t in (("A", a), ("B", b)):
            status, into = viz.kv_status(t, layer, head)
            kept[label] = set(np.nonzero((status == 0) | (status == 3))[0].tolist())  # held, quantized or not
            html.append(f"<h4>{label}: {t.methods or 'none'}, layer {layer}, KV head {head}</h4>"
                        + viz.kv_html(pieces, t.modality.numpy(), status, into))
            if "decode_kept" in t.extra:  # a decode-time method: the generated tokens it kept in this layer
                gen = viz.generated_kv_status(t, layer)
                words = [self.bundle.tokenizer.decode([i]) for i in t.answer_ids[:len(gen)]]
                html.append("<div class='mmlab-kv-generated'><b>generated:</b></div>"
                            + viz.kv_html(words, np.full(len(gen), -1), gen, np.full(len(gen), -1)))
        only_a, only_b = len(kept["A"] - kept["B"]), len(kept["B"] - kept["A"])
        html.insert(0, f"<div class='mmlab-kv-diff'>kept by A only: {only_a} tokens, by B only: {only_b}</div>")
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
        viz.draw_kv_scores(a, layer, head, axes[0])
        viz.plot_kv_per_layer({"A": a, "B": b}, axes[1])
        fig.tight_layout()
        return fig, "".join(html)

    def _pieces(self, ids: list[int], trace: Trace) -> list[str]:
        """One string per prompt token (source order): the token's text, '' for visual tokens."""
        text_ids = iter(i for i in ids if i != self.bundle.image_token_id)
        return ["" if m >= 0 else self.bundle.tokenizer.decode([next(text_ids)]) for m in trace.modality.tolist()]

    def modules(self, spec_text: str, layer: int) -> list[str]:
        """The quantized linears of ``layer`` (names after ``layers.{layer}.``)."""
        wq = [m for m in as_methods(spec_text) if m.quantizes_weights]
        if not wq:
            return []
        names = quantized_weights(self.bundle, wq[0]).weights
        tag = f"layers.{layer}."
        return [n.split(tag, 1)[1] for n in names if tag in n]

    def _quant(self, index, spec_a, spec_b, layer, head, module):
        import matplotlib.pyplot as plt

        mods = self.modules(spec_a, layer)
        if not mods:
            raise MethodError(f"{spec_a} quantizes no linear of layer {layer} (activation or KV quantization only)")
        module = module if module in mods else mods[0]
        runs = {label: sp for label, sp in (("A", spec_a), ("B", spec_b)) if self.modules(sp, layer)}
        qws = {label: quantized_weights(self.bundle, next(m for m in as_methods(sp) if m.quantizes_weights))
               for label, sp in runs.items()}
        name = next(n for n in qws["A"].weights if n.endswith(f"layers.{layer}.{module}"))
        w = dict(self.bundle.model.named_modules())[name].weight.detach()
        fig, axes = plt.subplots(1, 2 + len(qws), figsize=(4 * (2 + len(qws)), 3.6))
        for label, qw in qws.items():
            axes[0].hist((qw.weights[name] - w).flatten().numpy(), bins=80, histtype="step", label=label)
        axes[0].set(yscale="log", xlabel="W_q - W", title=f"layer {layer} {module}: weight error")
        axes[0].legend(fontsize=7)
        maps = {label: viz.group_error_map(w, qw.weights[name], _group(qw, as_methods(runs[label])))
                for label, qw in qws.items()}
        vmax = max(float(m.max()) for m in maps.values())
        for ax, (label, m) in zip(axes[1:], maps.items()):
            im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            bits = qws[label].notes.get(name, {}).get("group_bits")
            ax.set(xlabel="input group" + (f" (bits: {bits})" if bits else ""), ylabel="output rows (binned)",
                   title=f"{label}: mean |error| per group")
            fig.colorbar(im, ax=ax, fraction=0.046, label="mean |W_q - W| (shared scale)")
        errs = {label: viz.output_errors(self.bundle, self.samples[index], qw.weights,
                                         [n for n in qw.weights if f"layers.{layer}." in n]) for label, qw in
                qws.items()}
        names = list(errs["A"])
        for k, (label, e) in enumerate(errs.items()):
            axes[-1].barh(np.arange(len(names)) + 0.4 * k, [e[n] for n in names], height=0.4, label=label)
        axes[-1].set_yticks(np.arange(len(names)) + 0.2, [n.split(f"layers.{layer}.", 1)[1] for n in names],
                            fontsize=7)
        axes[-1].set(xlabel="relative output error on this sample", title=f"layer {layer}: every module")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        return fig, (f"<div>outliers kept in full precision: A {qws['A'].outliers}; "
                     f"effective bits per weight: A {qws['A'].weight_bits:.2f}</div>")

    # --- export and widgets -------------------------------------------------------------------------
    def export(self, name: str = "explorer_view", directory=None) -> list:
        """Save the current view with ``mmlab.figures.save`` and its provenance (model, sample, runs,
        layer, head, module)."""
        if self.last is None:
            raise ValueError("nothing to export yet: show a view first")
        fig, prov = self.last
        return figures.save(fig, name, params=prov, directory=directory)

    def show(self):
        """The widget: sample, run A (method, its knob, its other parameters), run B (a spec), layer,
        head or module, export; one line in red when a run fails."""
        return _Widgets(self).box


def _group(qw, methods) -> int | None:
    """The group size the weights were quantized with (a default may have adapted to the model)."""
    noted = qw.notes.get("*", {}).get("group_size")
    return noted or next((getattr(m, "group_size", None) for m in methods if m.quantizes_weights), None)


class _Widgets:
    def __init__(self, ex: Explorer):
        import ipywidgets as w
        from IPython.display import display

        self.ex, b = ex, ex.bundle
        names = ["none", *ex.method_names]
        first = ex.method_names[0] if ex.method_names else "none"  # a list given by the caller: its first
        if ex.method_names and ex.method_names == ex.runnable():  # else a method of the model's main family
            fam = "token_pruning" if b.multimodal else "kv_cache"
            first = next((n for n in ex.method_names if method_class(n).family == fam), first)
        self.sample = w.IntSlider(0, 0, len(ex.samples) - 1, description="sample")
        self.method = w.Dropdown(options=names, value=first, description="A: method")
        self.knob = w.FloatSlider(description="knob", continuous_update=False)
        self.params = w.Text(description="A: params", layout=w.Layout(width="420px"))
        self.compare = w.Text(value="none", description="B: spec", continuous_update=False,
                              layout=w.Layout(width="420px"))
        self.layer = w.IntSlider(0, 0, b.n_layers - 1, description="layer", continuous_update=False)
        self.head = w.Dropdown(description="head")
        self.module = w.Dropdown(description="module")
        self.save = w.Button(description="export view", icon="save")
        self.error, self.info, self.out, self.saved = w.HTML(), w.HTML(), w.Output(), w.HTML()
        self.error.add_class("mmlab-error")
        self.info.add_class("mmlab-info")
        self._busy = False
        self._configure_method()
        for c in (self.sample, self.knob, self.layer, self.head, self.module):
            c.observe(self.update, names="value")
        for c in (self.params, self.compare):
            c.observe(self.update, names="value")
        self.method.observe(self._on_method, names="value")
        self.save.on_click(self._export)
        self.update()
        self.box = w.VBox([w.HBox([self.sample, self.method, self.knob]), w.HBox([self.params, self.compare]),
                           w.HBox([self.layer, self.head, self.module, self.save]), self.saved, self.error, self.info,
                           self.out])
        self.box.add_class("mmlab-explorer")
        display(self.box)

    def _configure_method(self) -> None:
        """Only the chosen method's controls: its knob (slider) and its other parameters (placeholder)."""
        name = self.method.value
        self._busy = True
        try:
            k, others = Explorer.controls(name) if name != "none" else (None, {})
            self.knob.layout.display = "none" if k is None else None
            if k is not None:
                lo, hi, step = (1, 8, 1) if k == "bits" else (0.05, 1.0, 0.05)
                default = defaults(name)[k]
                self.knob.min, self.knob.max, self.knob.step = lo, hi, step
                self.knob.value = default if isinstance(default, (int, float)) and lo <= default <= hi else 0.25
                self.knob.description = k
            self.params.value = ""
            self.params.placeholder = ", ".join(f"{p}={v!r}" for p, v in others.items())
            self.params.layout.display = "none" if not others else None
        finally:
            self._busy = False

    def _on_method(self, _=None) -> None:
        self._configure_method()
        self.update()

    def _configure_view(self, fam: str, spec_a: str) -> None:
        """Head choices for the attention / KV views, module choices for the quantization view."""
        self._busy = True
        try:
            c = self.ex.bundle.decoder.config
            heads = [("mean", -1)] + [(str(h), h) for h in range(c.num_attention_heads)]  # -1: a shown label
            if fam == "kv_cache":
                heads = [(f"KV {h}", h) for h in range(c.num_key_value_heads)]
            if [o[1] for o in self.head.options] != [h[1] for h in heads]:
                keep = self.head.value if self.head.value in [h[1] for h in heads] else heads[0][1]
                self.head.options = heads
                self.head.value = keep  # never left without a selection
            self.head.layout.display = None if fam in ("token_pruning", "kv_cache", "none") else "none"
            mods = self.ex.modules(spec_a, self.layer.value) if fam == "quantization" else []
            if list(self.module.options) != mods:
                keep = self.module.value if self.module.value in mods else (mods[0] if mods else None)
                self.module.options = mods
                self.module.value = keep
            self.module.layout.display = None if mods else "none"
        finally:
            self._busy = False

    def update(self, _=None) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        if self._busy:
            return
        try:
            k = None if self.knob.layout.display == "none" else self.knob.value
            if k is not None and self.knob.step == 1:
                k = int(k)
            spec_a = Explorer.spec(self.method.value, k, self.params.value)
            spec_b = spec(as_methods(self.compare.value.strip() or "none"))
            fam = family(as_methods(spec_a))
            self._configure_view(fam, spec_a)
            head = None if self.head.value in (None, -1) else self.head.value
            fig, html = self.ex.view(self.sample.value, spec_a, spec_b, self.layer.value, head, self.module.value)
        except Exception as e:  # one visible line; nothing stale stays under the new selection
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            label = "" if isinstance(e, MethodError) else f"{type(e).__name__}: "
            self.error.value = (f"<span class='mmlab-error-text' style='color:#b00020'>error: "
                                f"{escape(label + first)}</span>")
            self.info.value = ""
            self.out.clear_output()
            return
        self.error.value = ""
        self.info.value = html
        with self.out:
            self.out.clear_output(wait=True)
            display(fig)
            plt.close(fig)

    def _export(self, _=None) -> None:
        try:
            paths = self.ex.export()
            self.saved.value = f"saved {', '.join(str(p) for p in paths)}"
        except (ValueError, OSError) as e:
            self.saved.value = f"<span style='color:#b00020'>export failed: {e}</span>"
