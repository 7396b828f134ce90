"""Report figures and tables, rebuilt from collected sweep tables alone (``mmlab figures``).

Each entry of ``FIGURES`` names the sweep whose ``runs/SWEEP/results.csv`` it reads and a
function drawing one figure from that table (the rows of one ``task`` where a notebook records
several tables at once). Adding a report figure = one function + one entry. Nothing here runs
a model; a drawing of a test image regenerates it from its recorded seed and index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mmlab import figures, viz
from mmlab.data.shapes import shapes


class NoRows(LookupError):
    """The collected table has no rows for this figure (e.g. a sweep recorded before it existed)."""


def task_rows(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """The ok rows of ``task`` (a notebook records several tables in one, told apart by ``task``)."""
    if "status" in df:
        df = df[df.status == "ok"]
    rows = df[df.task == task] if "task" in df else df.iloc[:0]
    if rows.empty:
        raise NoRows(f"no rows of task {task!r}")
    return rows


def _model(df: pd.DataFrame, default: str = "tiny-llava") -> str:
    """The model a sweep table was measured on (its ``model`` parameter; tables recorded before the
    parameter existed are tiny-llava's)."""
    names = df["model"].dropna().unique() if "model" in df else []
    return str(names[0]) if len(names) else default


def _ints(text) -> list[int]:
    return [int(v) for v in str(text).split()] if isinstance(text, str) and text else []


def _test_image(row):
    """The shapes test image a row was drawn on, regenerated from its seed and index."""
    return shapes(n=int(row.example) + 1, seed=int(row.seed), split="test")[int(row.example)]


def baseline_random_accuracy(df: pd.DataFrame):
    import matplotlib.pyplot as plt

    ok = df[df.status == "ok"].sort_values("keep_ratio")
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(ok.keep_ratio * 100, ok.accuracy * 100, marker="o", lw=2, label="overall")
    for col in sorted(c for c in ok.columns if c.startswith("acc_")):
        ax.plot(ok.keep_ratio * 100, ok[col] * 100, marker=".", ls="--", label=col[4:])
    _plain_log(ax, "x")
    ax.set_xlabel("visual tokens kept (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("tiny-llava, random visual-token pruning")
    _legend(ax)
    return fig


_METRICS = ("accuracy", "tflops", "flops_ratio", "perplexity", "kv_bytes", "decode_ms", "prefill_ms", "method_ms")


def _method_rows(df: pd.DataFrame, setting: str, task: str) -> tuple[pd.DataFrame, pd.Series | None]:
    """Rows of a method x ``setting`` grid table (mean over repeated runs) and the unmodified
    model's row (method ``none``), from ``mmlab.grid`` tables."""
    df = task_rows(df, task)
    metrics = [c for c in df.columns if c in _METRICS or c.startswith("acc_") or c == "n"]
    g = df.groupby(["method", setting], as_index=False)[metrics].mean()
    ref = g[g.method == "none"]
    return g[g.method != "none"], (ref.iloc[0] if len(ref) else None)


def _lines(ax, rows: pd.DataFrame, x: str, y: str, x_scale: float = 100, y_scale: float = 100, marker: str = "o"):
    """One line per method: ``y`` against ``x`` (scaled, e.g. fractions to %); an accuracy over ``n``
    samples gets its 95% binomial interval as a band (the spread a small n leaves)."""
    for name, g in rows.groupby("method"):
        g = g.sort_values(x)
        (line,) = ax.plot(g[x] * x_scale, g[y] * y_scale, marker=marker, label=name)
        if y == "accuracy" and "n" in g and g.n.notna().all():
            half = 1.96 * np.sqrt(g[y] * (1 - g[y]) / g.n.clip(lower=1))
            ax.fill_between(g[x] * x_scale, (g[y] - half) * y_scale, (g[y] + half) * y_scale, color=line.get_color(),
                            alpha=0.12, lw=0)


def _legend(ax, **kw) -> None:
    """A legible legend (8 pt) outside the data, right of the axes (saved with a tight bounding box)."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, borderaxespad=0, **kw)


def _plain_log(ax, axis: str = "y") -> None:
    """Log scale with plain tick labels (15, 20, 30), not 1.5x10^1; minor labels only over a short range."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{axis}scale")("log")
    a = getattr(ax, f"{axis}axis")
    lo, hi = getattr(ax, f"get_{axis}lim")()
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    a.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if hi / max(lo, 1e-12) < 100 else NullFormatter())


def _percent_ticks(ax, ratios) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ticks = sorted(set(float(r) * 100 for r in ratios))
    ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def pruning_accuracy(df: pd.DataFrame):
    """Accuracy vs % of visual tokens kept, one line per method; the unpruned model dashed."""
    import matplotlib.pyplot as plt

    rows, dense = _method_rows(df, "keep_ratio", "pruning")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _lines(ax, rows, "keep_ratio", "accuracy")
    if dense is not None:
        ax.axhline(dense.accuracy * 100, color="k", ls="--", lw=1, label="no pruning")
    _percent_ticks(ax, rows.keep_ratio)
    ax.set_xlabel("visual tokens kept (%)")
    ax.text(0, -0.3, "fastv: from layer K on; pdrop: per stage; aim: after merging, before in-LLM pruning",
            transform=ax.transAxes, fontsize=7, color="0.4")  # under the axes: never behind the data or legend
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{_model(df)}, shapes VQA: accuracy vs keep ratio")
    _legend(ax)
    return fig


def pruning_accuracy_vs_tflops(df: pd.DataFrame):
    """Accuracy vs analytic prefill TFLOPs of the language model (from the Traces' token counts)."""
    import matplotlib.pyplot as plt

    rows, dense = _method_rows(df, "keep_ratio", "pruning")
    scale, unit = (1e3, "GFLOPs") if rows.tflops.max() > 0.01 else (1e6, "MFLOPs")  # a real LLM vs tiny-llava
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _lines(ax, rows, "tflops", "accuracy", x_scale=scale)
    if dense is not None:
        ax.plot([dense.tflops * scale], [dense.accuracy * 100], marker="*", ms=12, color="k", ls="", label="no pruning")
    ax.set_xlabel(f"LLM prefill {unit} per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{_model(df)}: accuracy vs compute")
    _legend(ax)
    return fig


def pruning_per_type(df: pd.DataFrame):
    """One panel per question type: accuracy vs keep ratio for every method."""
    import matplotlib.pyplot as plt

    rows, dense = _method_rows(df, "keep_ratio", "pruning")
    types = sorted(c for c in rows.columns if c.startswith("acc_"))
    fig, axes = plt.subplots(1, len(types), figsize=(3 * len(types), 2.8), sharey=True, squeeze=False)
    for ax, col in zip(axes[0], types):
        _lines(ax, rows, "keep_ratio", col, marker=".")
        if dense is not None:
            ax.axhline(dense[col] * 100, color="k", ls="--", lw=1)
        _percent_ticks(ax, rows.keep_ratio)
        ax.set_title(col[4:])
        ax.set_xlabel("kept (%)")
    axes[0][0].set_ylabel("accuracy (%)")
    fig.suptitle(_model(df), fontsize=9)
    _legend(axes[0][-1])
    fig.tight_layout()
    return fig


def pruning_table(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) per method (rows) and keep ratio (columns), the unpruned model first."""
    rows, dense = _method_rows(df, "keep_ratio", "pruning")
    t = rows.pivot(index="method", columns="keep_ratio", values="accuracy") * 100
    t.columns = [f"{c:.0%}" for c in t.columns]
    if dense is not None:
        t.insert(0, "100% (none)", dense.accuracy * 100)
    return t.round(1)


def _kv_plot(df: pd.DataFrame, task: str, metric: str, ylabel: str, title: str, log: bool = False):
    import matplotlib.pyplot as plt

    rows, none = _method_rows(df, "budget", task)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _lines(ax, rows, "budget", metric, y_scale=100 if metric == "accuracy" else 1)
    if none is not None:
        ax.axhline(none[metric] * (100 if metric == "accuracy" else 1), color="k", ls="--", lw=1, label="full cache")
    if log:
        _plain_log(ax)
    ax.set_xlabel("KV budget (% of the context's cache kept)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax)
    return fig


def kv_perplexity(df: pd.DataFrame):
    """Continuation perplexity vs KV budget (smollm2-135m, offline corpus)."""
    return _kv_plot(df, "perplexity", "perplexity", "continuation perplexity", "smollm2-135m: perplexity vs KV budget",
                    log=True)


def kv_needle(df: pd.DataFrame):
    """Pass-code retrieval accuracy vs KV budget (question fed after the context is compressed)."""
    return _kv_plot(df, "needle", "accuracy", "retrieval accuracy (%)", "smollm2-135m: pass-code retrieval")


def kv_multi_image(df: pd.DataFrame):
    """tiny-llava, several images per prompt: accuracy vs KV budget (LOOK-M's text prior vs H2O, ...)."""
    model = _model(df[["vqa_model"]].set_axis(["model"], axis=1)) if "vqa_model" in df else _model(df)
    return _kv_plot(df, "multi_image", "accuracy", "accuracy (%)", f"{model}, multi-image context")


def kv_cost(df: pd.DataFrame):
    """Measured cache bytes and decode ms / token vs budget (needle prompts, smollm2-135m)."""
    import matplotlib.pyplot as plt

    rows, none = _method_rows(df, "budget", "needle")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    _lines(axes[0], rows, "budget", "kv_bytes", y_scale=1 / 2**20)
    _lines(axes[1], rows, "budget", "decode_ms", y_scale=1)
    if none is not None:
        axes[0].axhline(none.kv_bytes / 2**20, color="k", ls="--", lw=1, label="full cache")
        axes[1].axhline(none.decode_ms, color="k", ls="--", lw=1, label="full cache")
    axes[0].set_ylabel("KV cache after prefill (MiB)")
    axes[1].set_ylabel("decode ms / token (median)")
    for ax in axes:
        ax.set_xlabel("KV budget (%)")
    _legend(axes[1])
    fig.tight_layout()
    return fig


def _quant_rows(df: pd.DataFrame, task: str) -> tuple[pd.DataFrame, pd.Series | None]:
    df = task_rows(df, task)
    if "error" in df:
        df = df[df.error.isna()]
    ref = df[df.method == "none"]
    return df[df.method != "none"], (ref.iloc[0] if len(ref) else None)


def quant_perplexity(df: pd.DataFrame):
    """smollm2-135m: perplexity vs effective bits per weight (scales, zeros, outliers included)."""
    import matplotlib.pyplot as plt

    rows, fp = _quant_rows(df, "weights")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    groups = rows.group_size.map(lambda v: f"{int(float(v))}" if str(v).replace(".", "", 1).isdigit() else str(v))
    for (name, group), g in rows.groupby(["method", groups]):
        g = g.sort_values("weight_bits")
        ax.plot(g.weight_bits, g.perplexity, marker="o", ms=4, label=f"{name} g{group}")
    if fp is not None:
        ax.axhline(fp.perplexity, color="k", ls="--", lw=1, label="fp32")
    _plain_log(ax)
    ax.set_xlabel("effective bits per weight")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("smollm2-135m: weight quantization")
    _legend(ax)
    return fig


def quant_kv(df: pd.DataFrame):
    """KV-cache quantization (KIVI): continuation perplexity and cache bytes vs bits."""
    import matplotlib.pyplot as plt

    rows, fp = _quant_rows(df, "kv_cache")
    rows = rows.sort_values("bits")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].plot(rows.bits, rows.perplexity, marker="o")
    axes[1].plot(rows.bits, rows.kv_bytes / 2**20, marker="o")
    if fp is not None:
        axes[0].axhline(fp.perplexity, color="k", ls="--", lw=1, label="fp32 cache")
        axes[1].axhline(fp.kv_bytes / 2**20, color="k", ls="--", lw=1, label="fp32 cache")
    for ax, label in zip(axes, ("perplexity", "KV cache (MiB)")):
        ax.set_xlabel("KV bits")
        ax.set_ylabel(label)
        _legend(ax)
    fig.suptitle("smollm2-135m: KIVI KV-cache quantization", fontsize=9)
    return fig


# --- the notebooks' own figures, from the tables they record ---------------------------------------
def fastv_attention_share(df: pd.DataFrame):
    """FastV's observation: the share of the last prompt token's attention on image vs text tokens,
    per layer (left) and per token (right); mean over the recorded samples."""
    import matplotlib.pyplot as plt

    rows = task_rows(df, "attention_share")
    share = rows.groupby("layer")[["image_share", "text_share", "image_per_token", "text_per_token",
                                   "image_tokens", "text_tokens", "samples"]].mean()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    share[["image_share", "text_share"]].plot(ax=axes[0], marker="o")
    axes[0].set_ylabel("share of last-token attention")
    share[["image_per_token", "text_per_token"]].plot(ax=axes[1], marker="o", logy=True)
    axes[1].set_ylabel("attention per token")
    for ax in axes:
        ax.set_xlabel("decoder layer")
        ax.set_xticks(share.index)
    fig.suptitle(f"{rows.model.iloc[0]}: {int(share.image_tokens.iloc[0])} image vs {int(share.text_tokens.iloc[0])} "
                 f"text tokens ({int(share.samples.iloc[0])} samples)")
    fig.tight_layout()
    return fig


def kept_tokens(df: pd.DataFrame):
    """What each method keeps of one test image: the visual tokens entering the first layer (top;
    colours = merge groups, representatives outlined) and those still present in the last (bottom)."""
    import matplotlib.pyplot as plt

    rows = task_rows(df, "kept_tokens")
    sample = _test_image(rows.iloc[0])
    configs, layers = list(dict.fromkeys(rows.config)), sorted(rows.layer.unique())
    fig, axes = plt.subplots(len(layers), len(configs), figsize=(2.6 * len(configs) + 1, 2.8 * len(layers)),
                             squeeze=False)
    for j, name in enumerate(configs):
        for i, layer in enumerate(layers):
            r = rows[(rows.config == name) & (rows.layer == layer)].iloc[0]
            grid = tuple(int(v) for v in r.grid.split("x"))
            ax = axes[i, j]
            if i == 0 and _ints(r.groups):
                viz.draw_groups(sample.image, np.array(_ints(r.groups)), _ints(r.reps), grid, ax,
                                f"{name}: {r.present} in")
            elif i == 0:
                viz.draw_status(sample.image, np.array(_ints(r.tokens)), grid, ax, f"{name}: {r.present} in")
            else:
                viz.draw_status(sample.image, np.array(_ints(r.tokens)), grid, ax,
                                f"layer {layer}: {r.present} left -> {r.answer!r}")
    fig.suptitle(f"{sample.question}  (truth: {sample.answer}; keep {rows.picture_keep.iloc[0]:.0%})")
    fig.tight_layout()
    return fig


def adjacent_key_similarity(df: pd.DataFrame):
    """KVMerger's observation: cosine similarity of each cached key with the previous token's key
    (mean over KV heads), per layer along one context, and the share above its threshold."""
    import matplotlib.pyplot as plt

    rows = task_rows(df, "key_similarity").drop_duplicates(["model", "layer"])
    models = list(dict.fromkeys(rows.model))
    maps = {m: np.array([[float(v) for v in r.split()] for r in rows[rows.model == m].sort_values("layer").similarity])
            for m in models}
    threshold = float(rows.threshold.iloc[0])
    fig, axes = plt.subplots(1, len(models), figsize=(11, 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": [max(1, m.shape[1] // 200) for m in maps.values()]})
    for ax, (name, sim) in zip(axes[0], maps.items()):
        im = ax.imshow(sim, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.grid(False)
        ax.set_yticks(range(0, sim.shape[0], max(1, sim.shape[0] // 6)))
        ax.set_xlabel("token position")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: {(sim > threshold).mean():.0%} of adjacent pairs > {threshold}", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, label="cosine similarity")
    return fig


def arank_layers(df: pd.DataFrame):
    """gamma-MoD's ARank per layer (red: the layers chosen as MoD layers), per model."""
    import matplotlib.pyplot as plt

    rows = task_rows(df, "arank").drop_duplicates(["model", "layer"])
    models = list(dict.fromkeys(rows.model))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3), squeeze=False)
    for ax, name in zip(axes[0], models):
        r = rows[rows.model == name].sort_values("layer")
        ax.bar(r.layer, r.arank, color=["C3" if c else "C0" for c in r.chosen.astype(bool)])
        ax.set_title(f"{name}: ARank ({int(r.samples.iloc[0])} prompts; red = chosen)", fontsize=8)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("mean rank of attention map")
    fig.tight_layout()
    return fig


def mod_accuracy(df: pd.DataFrame):
    """Accuracy vs LLM prefill TFLOPs and KV bytes (% of dense) of each MoD configuration; the
    constant-ratio configurations as a curve."""
    import matplotlib.pyplot as plt

    rows = task_rows(df, "configs")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    const = rows[rows.config.str.startswith("constant ") & ~rows.config.str.contains("matched")]
    for ax, x, label in [(axes[0], "tflops_pct", "LLM prefill TFLOPs (% of dense)"),
                         (axes[1], "kv_pct", "KV bytes (% of dense)")]:
        ax.plot(const[x], const.accuracy * 100, marker="o", color="0.6", label="constant ratio (curve)")
        for _, r in rows[~rows.index.isin(const.index)].iterrows():
            ax.plot(r[x], r.accuracy * 100, marker="*" if "trained" in r.config else "o", ms=10, ls="", label=r.config)
        ax.set_xlabel(label)
    axes[0].set_ylabel("accuracy (%)")
    _legend(axes[1])
    fig.suptitle(f"{rows.model.iloc[0]}: MoD schedules at mean retention {rows.target_retention.iloc[0]:.3f} "
                 f"({int(rows.n.iloc[0])} samples)")
    fig.tight_layout()
    return fig


def yopo_cuts(df: pd.DataFrame):
    """YOPO's cuts alone (one line per cut, over its setting) and together: accuracy against the prefill
    FLOPs a sparse kernel would do (the masks' allowed pairs; removed tokens), as a reduction factor."""
    import matplotlib.pyplot as plt

    rows = task_rows(df, "cuts")
    dense = rows[rows.cut == "none"]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, g in rows[~rows.cut.isin(["none", "combined"])].groupby("cut", sort=False):
        g = g.sort_values("sparse_flops_ratio")
        ax.plot(g.sparse_flops_ratio, g.accuracy * 100, marker="o", label=name)
        for r in g.itertuples():
            ax.annotate(f"{r.setting:g}", (r.sparse_flops_ratio, r.accuracy * 100), fontsize=6, color="0.35",
                        xytext=(3, 2), textcoords="offset points")
    for r in rows[rows.cut == "combined"].itertuples():
        ax.plot([r.sparse_flops_ratio], [r.accuracy * 100], marker="*", ms=11, ls="", label=f"all three: {r.method}")
    if len(dense):
        ax.axhline(dense.accuracy.iloc[0] * 100, color="k", ls="--", lw=1, label="no cut")
    ax.set_xlabel("LLM prefill FLOPs reduction (x, sparse-kernel count)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{_model(df)}: YOPO's cuts ({int(rows.n.max())} samples)")
    _legend(ax)
    return fig


def routed_tokens(df: pd.DataFrame):
    """The schedule as executed on one test image: visual tokens per layer, and which were routed."""
    import matplotlib.pyplot as plt

    rows = task_rows(df, "routed")
    sample = _test_image(rows.iloc[0])
    configs, layers = list(dict.fromkeys(rows.config)), sorted(rows.layer.unique())
    fig, axes = plt.subplots(len(configs), len(layers) + 1, figsize=(2.4 * (len(layers) + 1), 2.5 * len(configs)),
                             squeeze=False)
    for row, name in zip(axes, configs):
        r = rows[rows.config == name].sort_values("layer")
        row[0].plot(r.layer, r.present, marker="o")
        row[0].set_title(name, fontsize=8)
        row[0].set_xlabel("layer")
        row[0].set_ylim(0, len(_ints(r.tokens.iloc[0])) + 5)
        for ax, (_, lr) in zip(row[1:], r.iterrows()):
            viz.draw_status(sample.image, np.array(_ints(lr.tokens)), tuple(int(v) for v in lr.grid.split("x")), ax,
                            f"layer {lr.layer}: {lr.present} routed")
    fig.suptitle(f"{sample.question} (truth {sample.answer})")
    fig.tight_layout()
    return fig


def main_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Each benchmark run's first (main) metric per task, whatever its name (lmms-eval and lm-eval
    list a task's metrics in its YAML's order)."""
    return df.groupby(["run_id", "task"], sort=False).head(1)


def _main_metric_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Each benchmark run's first (main) metric per task, with its method family (``none`` = dense)."""
    if "status" in df:
        df = df[df.status == "ok"]
    if df.empty or "metric" not in df:
        raise NoRows("no benchmark rows")
    if "run_id" not in df:  # one run's own table (the notebook) rather than a collected sweep
        df = df.assign(run_id="run")
    rows = main_metrics(df).copy()
    rows["family"] = rows.methods.fillna("none").str.replace(r"\(.*", "", regex=True)
    return rows


def bench_accuracy_vs_tflops(df: pd.DataFrame):
    """Each benchmark task's main metric against the LLM's prefill TFLOPs, one line per method family
    (mean cost of the task's answers); the dense model as a star. Titles give the sample count."""
    import matplotlib.pyplot as plt

    rows = _main_metric_rows(df)
    tasks = list(dict.fromkeys(rows.task))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        t = rows[rows.task == task]
        for fam, g in t[t.family != "none"].groupby("family"):
            g = g.sort_values("tflops")
            ax.plot(g.tflops * 1e6, g.value, marker="o", label=fam)
        dense = t[t.family == "none"]
        if len(dense):
            ax.plot(dense.tflops * 1e6, dense.value, marker="*", ms=12, color="k", ls="", label="no method")
        ax.set_xlabel("LLM prefill MFLOPs per answer")
        ax.set_ylabel(t.metric.iloc[0])
        ax.set_title(f"{t.model.iloc[0]} on {task} (n={int(t.n.max())} per run)", fontsize=9)
        _legend(ax)
    return fig


def _ours(df: pd.DataFrame, tasks: list[str], methods: str, metric: str) -> dict[str, float]:
    """Per task, our value of ``metric`` (``main``: the task's first metric) under ``methods``
    (mean over repeated runs)."""
    if metric == "main":
        df = main_metrics(df)
    else:
        df = df[df.metric == metric]
    rows = df[(df.methods == methods) & df.task.isin(tasks)]
    return rows.groupby("task").value.mean().to_dict()


def paper_table(paper: dict, df: pd.DataFrame | None) -> pd.DataFrame:
    """A recipe's reference rows beside ours (empty cells until its runs exist): absolute values as
    they are, ``relative`` rows as % of the unmodified model's score averaged over the tasks."""
    from mmlab.methods import parse, spec

    if df is not None and "status" in df:
        df = df[df.status == "ok"]
    out = []
    for row in paper["rows"]:
        tasks = [row["tasks"]] if isinstance(row["tasks"], str) else list(row["tasks"])
        methods = spec(parse(row["methods"]))
        ours, n = float("nan"), 0
        if df is not None and "metric" in df:
            got = _ours(df, tasks, methods, row["metric"])
            base = _ours(df, tasks, "none", row["metric"]) if row.get("relative") else {}
            if row.get("relative"):
                ratios = [100 * got[t] / base[t] for t in tasks if t in got and base.get(t)]
                ours, n = (float(np.mean(ratios)), len(ratios)) if ratios else (ours, 0)
            elif got:
                ours, n = float(np.mean([got[t] for t in tasks if t in got])), len(got)
        out.append({"tasks": ", ".join(tasks), "methods": methods, "metric": row["metric"] + (
            " (% of no method)" if row.get("relative") else ""), "paper": row["value"], "ours": ours,
            "tasks measured": f"{n}/{len(tasks)}", "note": row.get("note", "")})
    return pd.DataFrame(out)


def dpn_experts(df: pd.DataFrame):
    """DPN's trained experts against its controls: accuracy against the share of visual tokens the LLM's layers
    processed (one marker per checkpoint), and the visual tokens the router left per question type."""
    import matplotlib.pyplot as plt

    rows, routing = task_rows(df, "grid"), task_rows(df, "routing")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.6, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    for (name, g), marker in zip(rows.groupby("model", sort=False), "os^D"):
        ax.plot(g.vision_retention * 100, g.accuracy * 100, marker=marker, ls="", label=name)
        for r in g.itertuples():
            ax.annotate(r.method, (r.vision_retention * 100, r.accuracy * 100),
                        fontsize=6, color="0.35", xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("visual tokens processed (% of dense, mean over layers)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"DPN's experts ({int(rows.n.max())} samples)")
    ax.legend(loc="lower right", fontsize=7)
    if len(routing):
        bx.bar(routing.qtype, routing.vision_retention * 100, color="C0")
        bx.set_ylabel("visual tokens processed (%)")
        bx.set_title("router's pyramid by question type", fontsize=9)
    return fig


FIGURES = {
    "baseline_random_accuracy": ("baseline_random", baseline_random_accuracy),
    "token_pruning_accuracy": ("token_pruning", pruning_accuracy),
    "token_pruning_tflops": ("token_pruning", pruning_accuracy_vs_tflops),
    "token_pruning_per_type": ("token_pruning", pruning_per_type),
    "kv_perplexity": ("kv_cache", kv_perplexity),
    "kv_needle": ("kv_cache", kv_needle),
    "kv_multi_image": ("kv_cache", kv_multi_image),
    "kv_cost": ("kv_cache", kv_cost),
    "deep_kv_multi_image": ("kv_cache_deep", kv_multi_image),
    "quant_perplexity": ("quantization", quant_perplexity),
    "quant_kv": ("quantization", quant_kv),
    "deep_token_pruning_accuracy": ("token_pruning_deep", pruning_accuracy),
    "deep_token_pruning_tflops": ("token_pruning_deep", pruning_accuracy_vs_tflops),
    "deep_token_pruning_per_type": ("token_pruning_deep", pruning_per_type),
    "01_fastv_attention_share": ("token_pruning", fastv_attention_share),
    "deep_fastv_attention_share": ("token_pruning_deep", fastv_attention_share),
    "01_kept_tokens": ("token_pruning", kept_tokens),
    "02_adjacent_key_similarity": ("kv_cache", adjacent_key_similarity),
    "03_arank": ("mod_ratios", arank_layers),
    "03_mod_accuracy": ("mod_ratios", mod_accuracy),
    "deep_arank": ("mod_ratios_deep", arank_layers),
    "deep_mod_accuracy": ("mod_ratios_deep", mod_accuracy),
    "smol_token_pruning_accuracy": ("token_pruning_smol", pruning_accuracy),
    "smol_token_pruning_tflops": ("token_pruning_smol", pruning_accuracy_vs_tflops),
    "smol_token_pruning_per_type": ("token_pruning_smol", pruning_per_type),
    "smol_fastv_attention_share": ("token_pruning_smol", fastv_attention_share),
    "smol_arank": ("mod_ratios_smol", arank_layers),
    "smol_mod_accuracy": ("mod_ratios_smol", mod_accuracy),
    "smol_kv_multi_image": ("kv_cache_smol", kv_multi_image),
    "03_routed_tokens": ("mod_ratios", routed_tokens),
    "yopo_cuts": ("yopo", yopo_cuts),
    "deep_yopo_cuts": ("yopo_deep", yopo_cuts),
    "dpn_experts": ("dpn", dpn_experts),
    "benchmarks_accuracy_vs_tflops": ("benchmarks", bench_accuracy_vs_tflops),
}


def sample_count(df: pd.DataFrame) -> int | None:
    """The samples behind a sweep table: its largest ``n_samples`` (None when it records none)."""
    col = pd.to_numeric(df["n_samples"], errors="coerce") if "n_samples" in df else pd.Series(dtype=float)
    return int(col.max()) if col.notna().any() else None


def _figure_samples(path: Path) -> int | None:
    try:
        return figures.provenance(path)["params"].get("n_samples")
    except (OSError, ValueError):
        return None


def _table_samples(path: Path) -> int | None:
    """``n_samples`` of a table this module wrote: its header line, else the largest in its column."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    for ln in lines[:4]:
        if ln.startswith("<!-- n_samples:"):
            v = ln.split(":", 1)[1].strip(" ->")
            return int(v) if v.isdigit() else None
    header = next((ln for ln in lines if ln.startswith("|")), "")
    cols = [c.strip() for c in header.strip("|").split("|")]
    if "n_samples" not in cols:
        return None
    i = cols.index("n_samples")
    vals = [ln.strip("|").split("|")[i].strip() for ln in lines if ln.startswith("|")][2:]
    nums = [int(float(v)) for v in vals if v.replace(".", "", 1).isdigit()]
    return max(nums) if nums else None


def _keeps(existing: int | None, new: int | None, path: Path, table: Path, force: bool) -> bool:
    """True (and says why) when ``path`` holds results from more samples than ``table`` has."""
    if force or existing is None or (new is not None and new >= existing):
        return False
    print(f"keep {path} (n_samples={existing}): {table} has n_samples={new}; pass --force to overwrite, "
          f"or --out DIR to write elsewhere")
    return True


COUNTS = ("n_samples", "windows", "ppl_windows")  # sweep parameters that say how much data a figure rests on


def build_figures(runs_root: str | Path = "runs", out: str | Path | None = None, force: bool = False) -> list[Path]:
    """Every report figure whose sweep has a collected table; returns the files written. A figure
    made from fewer samples than the one already at its place is not written without ``force``."""
    import matplotlib.pyplot as plt

    figures.use_style()
    written = []
    for name, (sweep, draw) in FIGURES.items():
        table = Path(runs_root) / sweep / "results.csv"
        if not table.exists():
            print(f"skip {name}: no {table} (run `mmlab sweep sweeps/{sweep}.yaml` and `mmlab collect`)")
            continue
        df = pd.read_csv(table)
        n = sample_count(df)
        target = Path(out) if out else figures.FIGURES_DIR
        committed = _figure_samples(target / f"{name}.png")
        if committed is None and out is None:  # older figures carry no count: their sweep's committed table does
            committed = _table_samples(RESULTS / f"{sweep}.md")
        if _keeps(committed, n, target / f"{name}.png", table, force):
            continue
        try:
            fig = draw(df)
        except NoRows as e:
            print(f"skip {name}: {table} has {e} (re-run `mmlab sweep sweeps/{sweep}.yaml`)")
            continue
        failed = int((df.drop_duplicates("run_id").status != "ok").sum()) if "status" in df else 0
        counts = [f"{k} = {df[k].max():g}" for k in COUNTS if k in df and pd.api.types.is_numeric_dtype(df[k])]
        note = ", ".join(counts + [f"{failed} failed runs"] * bool(failed)) or "sample count not recorded"
        fig.text(0.995, 0.005, note, ha="right", va="bottom", fontsize=7, color="0.4")
        params = {"table": str(table), "rows": len(df), "n_samples": n, "failed_runs": failed}
        written += figures.save(fig, name, params=params, sweep=sweep, runs=df.run_id.tolist(), directory=target)
        plt.close(fig)
    return written


RESULTS = Path("papers/results")  # the committed tables (a figure's sweep table tells its samples, too)
DRAWING_TASKS = ("kept_tokens", "key_similarity", "routed")  # rows that hold maps for figures, not results


def write_tables(runs_root: str | Path = "runs", out: str | Path = RESULTS, force: bool = False) -> list[Path]:
    """Each collected sweep table as Markdown under ``papers/results/`` (metrics rounded; the rows
    that only hold token maps for figures left out; a failed run is a row with its error). The
    header states the runs and samples; a table from fewer samples than the one in place is not
    written without ``force``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in sorted(Path(runs_root).glob("*/results.csv")):
        df = pd.read_csv(table).drop(columns=["git_commit"], errors="ignore")
        p = out / f"{table.parent.name}.md"
        n = sample_count(df)
        if _keeps(_table_samples(p), n, p, table, force):
            continue
        runs = df.drop_duplicates("run_id")
        failed = int((runs.status != "ok").sum()) if "status" in runs else 0
        if "error" in df and df.error.isna().all():  # a failed run or grid point keeps its error in its row
            df = df.drop(columns=["error"])
        if "task" in df:
            df = df[~df.task.isin(DRAWING_TASKS)].dropna(axis=1, how="all")
        cells = df.astype(object).where(df.notna(), None)  # a missing value is a blank cell, not "nan"
        p.write_text(f"# {table.parent.name}\n\n<!-- n_samples: {n} -->\nFrom `{table}`: {len(runs)} runs "
                     f"({len(runs) - failed} ok, {failed} failed; {len(df)} rows), "
                     f"n_samples = {n if n is not None else 'not recorded'}.\n\n"
                     + cells.to_markdown(index=False, floatfmt=".4g", missingval="") + "\n")
        written.append(p)
    return written
