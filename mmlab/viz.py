"""Drawings and widgets, read from a Trace (nothing here recomputes what the Trace holds).

- ``draw_tokens`` / ``draw_status``: the image with kept / pruned / merged visual tokens of one layer.
- ``token_table``: the same as rows, for sweeps to record and ``mmlab figures`` to redraw.
- ``draw_attention``: one layer's (and head's) attention from the last prompt token over
  the image tokens, on the image grid.
- ``draw_merges`` / ``draw_groups``: the image coloured by merge group (pool, AIM), survivors outlined.
- ``key_similarity_map``: adjacent-key cosine similarity along the sequence, per layer (KVMerger).
- ``attention_share`` / ``attention_shares``: per layer, the share of the last prompt token's
  attention that image / text tokens receive (FastV's observation), one run / over samples.
- ``plot_tokens_per_layer``: per-layer token counts of several traces.
- ``Explorer``: the ipywidgets explorer of ``notebooks/05_explorer.ipynb``.
"""

from __future__ import annotations

import numpy as np
import torch

from mmlab.evaluate import run
from mmlab.methods import available, get, knob
from mmlab.trace import Trace


def _image_positions(trace: Trace, image: int) -> torch.Tensor:
    """Source indices of image ``image``'s visual tokens, in grid order."""
    return torch.nonzero(trace.modality == image).flatten()


def token_status(trace: Trace, layer: int = 0, image: int = 0) -> np.ndarray:
    """Per visual token of ``image`` (grid order): 1 = present at ``layer``, 0 = removed,
    2 = absorbed by a merge (its slot survives in another token)."""
    src = _image_positions(trace, image)
    status = np.zeros(src.numel())
    kept = trace.image_kept.get(image, torch.arange(src.numel()))
    present = set(trace.layer_tokens[layer].tolist()) if trace.layer_tokens else set(src.tolist())
    for k in kept.tolist():
        if int(src[0]) + k in present:
            status[k] = 1
    merged = trace.image_merged_into.get(image)
    if merged is not None:
        for k, slot in enumerate(merged.tolist()):
            if status[k] == 0 and slot >= 0:
                status[k] = 2
    return status


def draw_status(image, status: np.ndarray, grid: tuple[int, int] | None, ax=None, title: str | None = None):
    """The image with the tokens of ``status`` (grid order; 1 present, 0 removed, 2 merged) drawn:
    removed shaded dark, merged hatched."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ax = ax or plt.gca()
    ax.imshow(image)
    if grid is None:
        ax.set_title(title or "(no 2-D token grid for this model)")
        ax.axis("off")
        return ax
    rows, cols = grid
    h, w = np.asarray(image).shape[:2]
    ph, pw = h / rows, w / cols
    for k, st in enumerate(status):
        r, c = divmod(k, cols)
        if st == 0:
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, color="black", alpha=0.65, lw=0))
        elif st == 2:
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, hatch="///", edgecolor="white", lw=0))
    ax.set_title(title or f"{int((status == 1).sum())}/{len(status)} visual tokens")
    ax.axis("off")
    return ax


def draw_groups(image, groups: np.ndarray, reps: list[int], grid: tuple[int, int], ax=None, title: str | None = None):
    """Each visual token coloured by the merged token (``groups``, grid order) it went into; the
    representatives ``reps`` outlined."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ax = ax or plt.gca()
    rows, cols = grid
    h, w = np.asarray(image).shape[:2]
    colours = np.random.default_rng(0).permutation(int(groups.max()) + 1)  # neighbours get distant hues
    ax.imshow(image)
    ax.imshow(colours[groups].reshape(rows, cols), cmap="tab20", alpha=0.45, extent=(0, w, h, 0),
              interpolation="nearest")
    ph, pw = h / rows, w / cols
    for k in reps:
        r, c = divmod(k, cols)
        ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="white", lw=0.8))
    ax.set_title(title or f"{int(groups.max()) + 1} merged tokens from {len(groups)}")
    ax.axis("off")
    return ax


def draw_tokens(trace: Trace, image, ax=None, layer: int = 0, image_index: int = 0, title: str | None = None):
    """The image with the tokens removed before ``layer`` shaded dark and merged ones hatched."""
    status = token_status(trace, layer, image_index) if trace.image_grid is not None else np.zeros(0)
    return draw_status(image, status, trace.image_grid, ax,
                       title or f"layer {layer}: {int((status == 1).sum())}/{len(status)} visual tokens")


def draw_merges(trace: Trace, image, ax=None, image_index: int = 0, title: str | None = None):
    """Each visual token coloured by the merged token it went into; representatives outlined.
    Falls back to ``draw_tokens`` for a method that only selected."""
    merged = trace.image_merged_into.get(image_index)
    if merged is None or trace.image_grid is None:
        return draw_tokens(trace, image, ax, image_index=image_index, title=title)
    return draw_groups(image, merged.numpy(), trace.image_kept[image_index].tolist(), trace.image_grid, ax, title)


def _ints(values) -> str:
    return " ".join(str(int(v)) for v in values)


def token_table(traces: dict[str, Trace], layers: list[int], image: int = 0):
    """What ``draw_tokens`` / ``draw_merges`` show, as rows a sweep can record and ``mmlab figures``
    can redraw: per (run label, layer) the status of each visual token (``tokens``: 1 present, 0 removed,
    2 merged, space-separated in grid order), merge groups and representatives."""
    import pandas as pd

    rows = []
    for label, tr in traces.items():
        merged = tr.image_merged_into.get(image)
        for layer in layers:
            st = token_status(tr, layer, image)
            rows.append({"config": label, "layer": layer, "tokens": _ints(st), "present": int((st == 1).sum()),
                         "grid": "x".join(map(str, tr.image_grid)) if tr.image_grid else "",
                         "groups": _ints(merged.tolist()) if merged is not None else "",
                         "reps": _ints(tr.image_kept[image].tolist()) if merged is not None else "",
                         "answer": tr.answer})
    return pd.DataFrame(rows)


def attention_share(trace: Trace):
    """Per layer with recorded attention: the share of the last prompt token's attention (mean of
    heads) on image and on text tokens, and per token (share / count: FastV's "efficiency")."""
    import pandas as pd

    rows = []
    for layer in sorted(trace.attentions):
        a = trace.attentions[layer][:, -1].mean(0)  # (k,) over the tokens that entered this layer
        is_img = trace.modality[trace.layer_tokens[layer]] >= 0
        n_img, n_txt = int(is_img.sum()), int((~is_img).sum())
        img, txt = float(a[is_img].sum()), float(a[~is_img].sum())
        rows.append({"layer": layer, "image_share": img, "text_share": txt, "image_tokens": n_img,
                     "text_tokens": n_txt, "image_per_token": img / max(1, n_img),
                     "text_per_token": txt / max(1, n_txt)})
    return pd.DataFrame(rows)


def attention_shares(bundle, samples):
    """FastV's observation over ``samples``: ``attention_share`` of each layer, averaged over the
    samples (one dense run each, every layer's scores recomputed)."""
    import pandas as pd

    layers = range(bundle.n_layers)
    shares = [attention_share(run(bundle, s, attention_layers=layers, max_new_tokens=1)) for s in samples]
    return pd.concat(shares).groupby("layer", as_index=False).mean().assign(samples=len(samples))


def key_similarity_map(cache) -> np.ndarray:
    """KVMerger's observation: (layers, n - 1) cosine similarity of each cached key with the previous
    token's key, mean over KV heads, from a prefill's cache (``mmlab.prefill(...).cache``)."""
    from mmlab.methods.kv_cache import adjacent_key_similarity

    return np.stack([adjacent_key_similarity(k[0]).mean(0).cpu().numpy() for k in cache.keys])


def key_similarity_table(cache, label: str, threshold: float):
    """``key_similarity_map`` as rows, one per layer: the similarities (a space-separated string) and
    the share of adjacent pairs above ``threshold`` (KVMerger's merging threshold)."""
    import pandas as pd

    sim = key_similarity_map(cache)
    return pd.DataFrame([{"model": label, "layer": i, "similarity": " ".join(f"{v:.4f}" for v in row),
                          "threshold": threshold, "above_threshold": float((row > threshold).mean())}
                         for i, row in enumerate(sim)])


def attention_grid(trace: Trace, layer: int, head: int | None = None, image_index: int = 0) -> np.ndarray:
    """(rows, cols) attention of the last prompt token over one image's tokens (NaN = absent)."""
    if layer not in trace.attentions:
        raise KeyError(f"the Trace has attention for layers {sorted(trace.attentions)}; "
                       f"run with attention_layers=[{layer}]")
    att = trace.attentions[layer]  # (heads, q, k) over the tokens that entered this layer
    a = att[:, -1].mean(0) if head is None else att[head, -1]
    rows, cols = trace.image_grid
    out = np.full(rows * cols, np.nan)
    first = int(_image_positions(trace, image_index)[0])
    for j, s in enumerate(trace.layer_tokens[layer].tolist()):  # source index = image start + grid cell
        if int(trace.modality[s]) == image_index:
            out[s - first] = float(a[j])
    return out.reshape(rows, cols)


def draw_attention(trace: Trace, image, layer: int, head: int | None = None, ax=None, image_index: int = 0):
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ax.imshow(image)
    if trace.image_grid is None:
        ax.set_title("(no 2-D token grid)")
        return ax
    g = attention_grid(trace, layer, head, image_index)
    h, w = np.asarray(image).shape[:2]
    im = ax.imshow(np.ma.masked_invalid(g), cmap="magma", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
    share = float(np.nansum(g))
    ax.set_title(f"layer {layer} {'mean of heads' if head is None else f'head {head}'}: "
                 f"{share:.0%} of last-token attention on image")
    ax.axis("off")
    plt.colorbar(im, ax=ax, fraction=0.046)
    return ax


def plot_tokens_per_layer(traces: dict[str, Trace], ax=None):
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    for label, tr in traces.items():
        ax.plot(tr.tokens_per_layer, marker="o", label=f"{label} (all)")
        ax.plot(tr.image_tokens_per_layer(), ls="--", marker=".", label=f"{label} (visual)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("tokens")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return ax


def summary_rows(traces: dict[str, Trace]) -> list[dict]:
    rows = []
    for label, tr in traces.items():
        f = tr.flops
        rows.append({"run": label, "answer": tr.answer, "prefill GFLOPs": round(f["prefill"] / 1e9, 3),
                     "KV kB": round(tr.kv_bytes / 1024, 1), "prefill ms": round(tr.timings["prefill_ms"], 1)})
    return rows


class Explorer:
    """Pick a sample, a method and its settings; see kept tokens, attention, counts, answer, cost.

    The baseline (no method) trace of each sample is computed once and cached; method runs
    are cached by (sample, method, keep_ratio), so moving the layer / head sliders only redraws.
    """

    def __init__(self, bundle, samples, methods: list[str] | None = None):
        self.bundle, self.samples = bundle, samples
        self.layers = list(range(bundle.n_layers))
        names = methods or [m for m in available() if get(m).needs_image]
        self.method_names = ["none", *names]
        self._cache: dict = {}
        self.runs = 0  # engine runs performed (the cache's effect is visible here)

    def trace(self, index: int, method: str, keep_ratio: float) -> Trace:
        key = (index, method, None if method == "none" else keep_ratio)
        if key not in self._cache:
            methods = [] if method == "none" else [get(method, **{knob(method): keep_ratio})]
            self._cache[key] = run(self.bundle, self.samples[index], methods, attention_layers=self.layers)
            self.runs += 1
        return self._cache[key]

    def figure(self, index: int, method: str, keep_ratio: float, layer: int, head: int | None):
        import matplotlib.pyplot as plt

        base = self.trace(index, "none", 1.0)
        tr = self.trace(index, method, keep_ratio)
        img = self.samples[index].image
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
        draw_tokens(tr, img, axes[0], layer=layer, title=f"{method}: tokens at layer {layer}")
        draw_attention(base, img, layer, head, axes[1])
        axes[1].set_title(f"baseline attention, layer {layer}", fontsize=8)
        draw_attention(tr, img, layer, head, axes[2])
        axes[2].set_title(f"{method} attention, layer {layer}", fontsize=8)
        plot_tokens_per_layer({"baseline": base, method: tr}, axes[3])
        fig.tight_layout()
        return fig, base, tr

    def show(self):
        import ipywidgets as w
        import matplotlib.pyplot as plt
        from IPython.display import display

        n_heads = self.bundle.decoder.config.num_attention_heads
        sample = w.IntSlider(0, 0, len(self.samples) - 1, description="sample")
        method = w.Dropdown(options=self.method_names, value=self.method_names[-1], description="method")
        keep = w.FloatSlider(value=0.25, min=0.05, max=1.0, step=0.05, description="keep_ratio")
        layer = w.IntSlider(0, 0, len(self.layers) - 1, description="layer")
        head = w.Dropdown(options=[("mean", None)] + [(str(h), h) for h in range(n_heads)], description="head")
        out, info = w.Output(), w.HTML()
        info.add_class("mmlab-info")

        def update(_=None):
            s = self.samples[sample.value]
            fig, base, tr = self.figure(sample.value, method.value, keep.value, layer.value, head.value)
            rows = summary_rows({"baseline": base, method.value: tr})
            cells = "".join(f"<tr>{''.join(f'<td>{v}</td>' for v in r.values())}</tr>" for r in rows)
            info.value = (f"<b>Q:</b> {s.question} &nbsp; <b>truth:</b> {s.answer} &nbsp; "
                          f"<b class='mmlab-answer'>{method.value}: {tr.answer}</b>"
                          f"<table><tr>{''.join(f'<th>{k}</th>' for k in rows[0])}</tr>{cells}</table>")
            with out:
                out.clear_output(wait=True)
                display(fig)
                plt.close(fig)

        for c in (sample, method, keep, layer, head):
            c.observe(update, names="value")
        update()
        box = w.VBox([w.HBox([sample, method, keep]), w.HBox([layer, head]), info, out])
        box.add_class("mmlab-explorer")
        display(box)
        return box
