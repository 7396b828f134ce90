"""Report figures and tables, rebuilt from collected sweep tables alone (``mmlab figures``).

Each entry of ``FIGURES`` names the sweep whose ``runs/SWEEP/results.csv`` it reads and a
function drawing one figure from that table. Adding a report figure = one function + one
entry. Nothing here runs a model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmlab import figures


def baseline_random_accuracy(df: pd.DataFrame):
    import matplotlib.pyplot as plt

    ok = df[df.status == "ok"].sort_values("keep_ratio")
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(ok.keep_ratio * 100, ok.accuracy * 100, marker="o", lw=2, label="overall")
    for col in sorted(c for c in ok.columns if c.startswith("acc_")):
        ax.plot(ok.keep_ratio * 100, ok[col] * 100, marker=".", ls="--", label=col[4:])
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens kept (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("tiny-llava, random visual-token pruning")
    ax.legend(fontsize=7)
    return fig


_METRICS = ("accuracy", "tflops", "flops_ratio", "perplexity", "kv_bytes", "decode_ms", "prefill_ms", "method_ms")


def _method_rows(df: pd.DataFrame, setting: str, task: str | None = None) -> tuple[pd.DataFrame, pd.Series | None]:
    """Rows of a method x ``setting`` grid table (mean over repeated runs) and the unmodified
    model's row (method ``none``), from ``mmlab.method_grid`` / ``perplexity_grid`` tables."""
    if "status" in df:
        df = df[df.status == "ok"]
    if task is not None:
        df = df[df.task == task]
    metrics = [c for c in df.columns if c in _METRICS or c.startswith("acc_")]
    g = df.groupby(["method", setting], as_index=False)[metrics].mean()
    ref = g[g.method == "none"]
    return g[g.method != "none"], (ref.iloc[0] if len(ref) else None)


def _lines(ax, rows: pd.DataFrame, x: str, y: str, x_scale: float = 100, y_scale: float = 100, marker: str = "o"):
    """One line per method: ``y`` against ``x`` (scaled, e.g. fractions to %)."""
    for name, g in rows.groupby("method"):
        g = g.sort_values(x)
        ax.plot(g[x] * x_scale, g[y] * y_scale, marker=marker, label=name)


def _percent_ticks(ax, ratios) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ticks = sorted(set(float(r) * 100 for r in ratios))
    ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def pruning_accuracy(df: pd.DataFrame):
    """Accuracy vs % of visual tokens kept, one line per method; the unpruned model dashed."""
    import matplotlib.pyplot as plt

    rows, dense = _method_rows(df, "keep_ratio")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _lines(ax, rows, "keep_ratio", "accuracy")
    if dense is not None:
        ax.axhline(dense.accuracy * 100, color="k", ls="--", lw=1, label="no pruning")
    _percent_ticks(ax, rows.keep_ratio)
    ax.set_xlabel("visual tokens kept (%)")
    ax.text(0.01, 0.01, "fastv: from layer K on; pdrop: per stage; aim: after merging, before in-LLM pruning",
            transform=ax.transAxes, fontsize=6, color="0.4")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("tiny-llava, shapes VQA: accuracy vs keep ratio")
    ax.legend(fontsize=7, ncol=2)
    return fig


def pruning_accuracy_vs_tflops(df: pd.DataFrame):
    """Accuracy vs analytic prefill TFLOPs of the language model (from the Traces' token counts)."""
    import matplotlib.pyplot as plt

    rows, dense = _method_rows(df, "keep_ratio")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _lines(ax, rows, "tflops", "accuracy", x_scale=1e6)
    if dense is not None:
        ax.plot([dense.tflops * 1e6], [dense.accuracy * 100], marker="*", ms=12, color="k", ls="", label="no pruning")
    ax.set_xlabel("LLM prefill MFLOPs per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs compute")
    ax.legend(fontsize=7, ncol=2)
    return fig


def pruning_per_type(df: pd.DataFrame):
    """One panel per question type: accuracy vs keep ratio for every method."""
    import matplotlib.pyplot as plt

    rows, dense = _method_rows(df, "keep_ratio")
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
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def pruning_table(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) per method (rows) and keep ratio (columns), the unpruned model first."""
    rows, dense = _method_rows(df, "keep_ratio")
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
        ax.set_yscale("log")
    ax.set_xlabel("KV budget (% of the context's cache kept)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
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
    return _kv_plot(df, "multi_image", "accuracy", "accuracy (%)", "tiny-llava, multi-image context")


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
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _quant_rows(df: pd.DataFrame, task: str) -> tuple[pd.DataFrame, pd.Series | None]:
    if "status" in df:
        df = df[df.status == "ok"]
    df = df[df.task == task]
    if "error" in df:
        df = df[df.error.isna()]
    ref = df[df.method == "none"]
    return df[df.method != "none"], (ref.iloc[0] if len(ref) else None)


def quant_perplexity(df: pd.DataFrame):
    """smollm2-135m: perplexity vs effective bits per weight (scales, zeros, outliers included)."""
    import matplotlib.pyplot as plt

    rows, fp = _quant_rows(df, "weights")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for (name, group), g in rows.groupby(["method", rows.group_size.astype(str)]):
        g = g.sort_values("weight_bits")
        ax.plot(g.weight_bits, g.perplexity, marker="o", ms=4, label=f"{name} g{group}")
    if fp is not None:
        ax.axhline(fp.perplexity, color="k", ls="--", lw=1, label="fp32")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("smollm2-135m: weight quantization")
    ax.legend(fontsize=6, ncol=2)
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
        ax.legend(fontsize=7)
    fig.suptitle("smollm2-135m: KIVI KV-cache quantization", fontsize=9)
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
    "quant_perplexity": ("quantization", quant_perplexity),
    "quant_kv": ("quantization", quant_kv),
}


def build_figures(runs_root: str | Path = "runs", out: str | Path | None = None) -> list[Path]:
    """Every report figure whose sweep has a collected table; returns the files written."""
    import matplotlib.pyplot as plt

    figures.use_style()
    written = []
    for name, (sweep, draw) in FIGURES.items():
        table = Path(runs_root) / sweep / "results.csv"
        if not table.exists():
            print(f"skip {name}: no {table} (run `mmlab sweep sweeps/{sweep}.yaml` and `mmlab collect`)")
            continue
        df = pd.read_csv(table)
        fig = draw(df)
        params = {"table": str(table), "rows": len(df)}
        written += figures.save(fig, name, params=params, sweep=sweep, runs=df.run_id.tolist(), directory=out)
        plt.close(fig)
    return written


def write_tables(runs_root: str | Path = "runs", out: str | Path = "papers/results") -> list[Path]:
    """Each collected sweep table as Markdown under ``papers/results/`` (metrics rounded)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in sorted(Path(runs_root).glob("*/results.csv")):
        df = pd.read_csv(table).drop(columns=["git_commit", "error"], errors="ignore")
        p = out / f"{table.parent.name}.md"
        p.write_text(f"# {table.parent.name}\n\nFrom `{table}` ({len(df)} runs).\n\n"
                     + df.to_markdown(index=False, floatfmt=".4g") + "\n")
        written.append(p)
    return written
