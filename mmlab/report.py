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


FIGURES = {
    "baseline_random_accuracy": ("baseline_random", baseline_random_accuracy),
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
