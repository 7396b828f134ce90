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
- ``kv_status`` / ``kv_html`` / ``draw_kv_scores`` / ``plot_kv_per_layer``: what a KV method did to each
  prompt token (kept, evicted, merged into which, quantized), per layer and KV head.
- ``draw_router_weights``: the trained Mixture-of-Depths routers' weights on the image grid.
- ``group_error_map`` / ``output_errors``: a quantized linear's error per group and on a sample.
The explorer of ``notebooks/05_explorer.ipynb`` is ``mmlab.explorer``.
"""

from __future__ import annotations

import numpy as np
import torch

from mmlab.evaluate import run
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


def draw_status(image, status: np.ndarray, grid: tuple[int, int] | None, ax=None, title: str | None = None,
                present: str = "kept", absent: str = "removed"):
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
    status_legend(ax, merged=bool((np.asarray(status) == 2).any()), present=present, absent=absent)
    return ax


def status_legend(ax, merged: bool = False, present: str = "kept", absent: str = "removed") -> None:
    """The key of ``draw_status``: what a clear, a shaded and a hatched cell mean."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="white", edgecolor="0.5", label=present),
               Patch(facecolor="black", alpha=0.65, label=absent)]
    if merged:
        handles.append(Patch(facecolor="0.6", hatch="///", edgecolor="white", label="merged"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=len(handles), fontsize=7,
              frameon=False, handlelength=1)


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
    """The last prompt token's attention over the image's tokens in ``layer`` (``head``; None: mean)."""
    if trace.image_grid is None:
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        ax.imshow(image)
        ax.set_title("(no 2-D token grid)")
        return ax
    g = attention_grid(trace, layer, head, image_index)
    which = "mean of heads" if head is None else f"head {head}"
    return draw_attention_grid(image, g, ax, title=f"layer {layer} {which}")


def draw_attention_grid(image, grid: np.ndarray, ax=None, vmax: float | None = None, title: str = ""):
    """An ``attention_grid`` over the image on a labelled colour bar (``vmax``: a scale shared with
    another map); a map with no visual token left says so."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ax.imshow(image)
    ax.axis("off")
    if not np.isfinite(grid).any():
        ax.set_title(f"{title}\nno visual tokens left at this layer", fontsize=8)
        return ax
    h, w = np.asarray(image).shape[:2]
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="magma", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest",
                   vmin=0, vmax=vmax)
    ax.set_title(f"{title}: {float(np.nansum(grid)):.0%} of last-token attention on image", fontsize=8)
    plt.colorbar(im, ax=ax, fraction=0.046, label="attention of the last prompt token")
    return ax


def draw_kept_diff(image, a: np.ndarray, b: np.ndarray, grid: tuple[int, int], ax=None):
    """Visual tokens present in run A only (blue), in B only (orange), in both (clear), in neither (dark)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    ax = ax or plt.gca()
    ax.imshow(image)
    rows, cols = grid
    h, w = np.asarray(image).shape[:2]
    ph, pw = h / rows, w / cols
    style = {(True, False): ("#1f77b4", 0.6), (False, True): ("#ff7f0e", 0.6), (False, False): ("black", 0.65)}
    for k, key in enumerate(zip(a.tolist(), b.tolist())):
        if key in style:
            r, c = divmod(k, cols)
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, color=style[key][0], alpha=style[key][1], lw=0))
    ax.set_title(f"A only {int((a & ~b).sum())}, B only {int((b & ~a).sum())}, both {int((a & b).sum())}",
                 fontsize=8)
    ax.axis("off")
    labels = ("A only", "B only", "neither")
    ax.legend(handles=[Patch(color=c, alpha=al, label=lb) for (c, al), lb in zip(style.values(), labels)],
              loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=7, frameon=False, handlelength=1)
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


# --- KV cache: what a method did to each prompt token, per layer and KV head -------------------------
KV_STATES = ("kept", "evicted", "merged", "quantized", "not in this layer")
KV_COLOURS = ("#bfe3bf", "#e6e6e6", "#ffc98a", "#bcd4ff", "#fafafa")


def kv_status(trace: Trace, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt token (source index): its state in ``layer``'s cache for KV head ``head``
    (an index into ``KV_STATES``) and, for a merged token, the source index it merged into (-1 else)."""
    n = trace.prompt_length
    status, into = np.full(n, 4), np.full(n, -1)
    src = trace.layer_tokens[layer].numpy()  # cache position -> source index
    status[src] = 0
    kept = trace.extra.get("kv_kept", {}).get(layer)
    if kept is not None:
        status[src] = 1
        status[src[kept[head].numpy()]] = 0
    merged = trace.extra.get("kv_merged_into", {}).get(layer)
    if merged is not None:
        m = merged[head].numpy()
        status[src[m >= 0]], into[src[m >= 0]] = 2, src[m[m >= 0]]
    quantized = trace.extra.get("kv_quantized", {}).get(layer)
    if quantized:  # the oldest keys of the (compressed) cache, in cache order
        order = src[kept[head].numpy()] if kept is not None else src
        status[order[: quantized[0]]] = 3
    return status, into


def generated_kv_status(trace: Trace, layer: int) -> np.ndarray:
    """Per generated token a decode-time method decided on (``trace.extra["decode_kept"]``, in the order they
    were fed back): its state in ``layer``'s cache at the end (an index into ``KV_STATES``: kept / evicted)."""
    kept = np.asarray(trace.extra.get("decode_kept", []), dtype=bool)
    if layer < trace.extra.get("decode_kept_from", 0):
        return np.zeros(len(kept), dtype=int)
    return np.where(kept, 0, 1)


def kv_html(pieces: list[str], modality: np.ndarray, status: np.ndarray, into: np.ndarray) -> str:
    """The prompt as text, each token coloured by its ``kv_status`` (hover: what happened to it);
    each image's tokens summarised in one box."""
    import html

    legend = "".join(f"<span style='background:{c};padding:0 4px;margin-right:4px'>{s}</span>"
                     for s, c in zip(KV_STATES, KV_COLOURS))
    out, i = [f"<div class='mmlab-kv-legend' style='margin-bottom:4px'>{legend}</div>"], 0
    while i < len(pieces):
        if modality[i] >= 0:  # one box per image
            j = i
            while j < len(pieces) and modality[j] == modality[i]:
                j += 1
            counts = ", ".join(f"{int((status[i:j] == k).sum())} {KV_STATES[k]}" for k in range(4)
                               if (status[i:j] == k).any())
            out.append(f"<span style='border:1px solid #888;padding:0 3px'>[image {modality[i]}: {j - i} tokens: "
                       f"{counts}]</span>")
            i = j
            continue
        tip = KV_STATES[status[i]] + (f" into #{into[i]} {pieces[into[i]]!r}" if into[i] >= 0 else "")
        deco = "line-through" if status[i] == 1 else "none"
        out.append(f"<span title='#{i} {html.escape(tip, quote=True)}' style='background:{KV_COLOURS[status[i]]};"
                   f"text-decoration:{deco}'>{html.escape(pieces[i])}</span>")
        i += 1
    return "<div class='mmlab-kv-text' style='white-space:pre-wrap;font-family:monospace;font-size:11px;" \
           "line-height:1.6'>" + "".join(out) + "</div>"


def draw_kv_scores(trace: Trace, layer: int, head: int, ax=None):
    """The attention each cached token received in ``layer`` (summed over the prompt's queries, the
    H2O score; query heads of KV head ``head`` averaged), coloured by its ``kv_status``."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    if layer not in trace.attentions:
        ax.set_title(f"no attention recorded for layer {layer}")
        return ax
    att = trace.attentions[layer]  # (heads, q, k) over the tokens that entered the layer
    group = trace.dims["q_dim"] // trace.dims["kv_dim"]  # query heads per KV head
    received = att[head * group:(head + 1) * group].sum(1).mean(0).numpy()
    status, _ = kv_status(trace, layer, head)
    src = trace.layer_tokens[layer].numpy()
    for k, (name, colour) in enumerate(zip(KV_STATES[:4], KV_COLOURS[:4])):
        sel = status[src] == k
        if sel.any():
            ax.scatter(src[sel], received[sel], s=6, color=colour, edgecolor="0.3", lw=0.2, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("prompt position")
    ax.set_ylabel("attention received (sum over queries)")
    ax.set_title(f"layer {layer}, KV head {head}: the scores H2O ranks by", fontsize=8)
    ax.legend(fontsize=7, markerscale=2)
    return ax


def plot_kv_per_layer(traces: dict[str, Trace], ax=None):
    """Cache length per layer after the prefill and its methods, and total bytes, per run."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    for label, tr in traces.items():
        ax.plot(tr.kv_lengths_final, marker="o", ms=3, label=f"{label}: {tr.kv_bytes / 1024:.0f} KiB")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("cached tokens after the methods")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return ax


# --- Mixture-of-Depths: routed tokens and router weights ---------------------------------------------
def draw_router_weights(trace: Trace, image, layer: int, ax=None, image_index: int = 0):
    """The trained router's weight of every live visual token in ``layer`` on the image grid."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ax.imshow(image)
    ax.axis("off")
    rec = trace.extra.get("router_weights", {}).get(layer)
    if rec is None or trace.image_grid is None:
        ax.set_title(f"layer {layer}: no router weights (not a routed layer, or a training-free method)",
                     fontsize=7)
        return ax
    src, w = rec
    rows, cols = trace.image_grid
    first = int(_image_positions(trace, image_index)[0])
    grid = np.full(rows * cols, np.nan)
    for s_, v in zip(src.tolist(), w.tolist()):
        if int(trace.modality[s_]) == image_index:
            grid[s_ - first] = v
    h, wd = np.asarray(image).shape[:2]
    im = ax.imshow(np.ma.masked_invalid(grid.reshape(rows, cols)), cmap="viridis", alpha=0.65, extent=(0, wd, h, 0),
                   interpolation="nearest")
    plt.colorbar(im, ax=ax, fraction=0.046, label="router weight")
    ax.set_title(f"layer {layer}: router weights", fontsize=8)
    return ax


# --- quantization: per module weight error, groups and output error ----------------------------------
def group_error_map(w: torch.Tensor, q: torch.Tensor, group_size: int | None, max_rows: int = 64) -> np.ndarray:
    """Mean |W - Q| per (block of rows, input group): (<= max_rows, groups)."""
    err = (w.float() - q.float()).abs()
    rows, cols = err.shape
    g = cols if not group_size else group_size
    per_group = err.reshape(rows, cols // g, g).mean(-1)
    step = max(1, rows // max_rows)
    return per_group[: rows - rows % step].reshape(-1, step, per_group.shape[1]).mean(1).numpy()


@torch.no_grad()
def output_errors(bundle, sample, weights: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    """Relative output error ||x (W - Q)^T|| / ||x W^T|| of each linear on ``sample``'s prefill inputs."""
    mods = dict(bundle.model.named_modules())
    inputs, hooks = {}, []

    def keep_input(name):
        def hook(module, args, output) -> None:  # returns None: the output is left as it is
            inputs.setdefault(name, args[0].detach())
        return hook

    for n in names:
        hooks.append(mods[n].register_forward_hook(keep_input(n)))
    try:
        run(bundle, sample, [], max_new_tokens=1)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in names:
        x, w = inputs[n].reshape(-1, inputs[n].shape[-1]).float().clone(), mods[n].weight.detach().float()
        out[n] = float((x @ (w - weights[n].float()).T).norm() / (x @ w.T).norm().clamp(min=1e-12))
    return out
