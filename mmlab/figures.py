"""One figure style, and ``save(fig, name)`` with provenance in the files' metadata.

PNG: a ``mmlab`` text chunk holding JSON (parameters, sweep / run ids, git commit).
PDF: the same JSON in the document's ``Subject`` field, plus a readable ``Title``.
``provenance(path)`` reads it back from either.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

FIGURES_DIR = Path(os.environ.get("MMLAB_FIGURES", "figures"))


def use_style() -> None:
    """The shared look: seaborn's whitegrid with paper-sized fonts."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1,
                  rc={"figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight"})


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "") if commit != "unknown" else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save(fig, name: str, *, params: dict | None = None, runs: list[str] | None = None, sweep: str | None = None,
         directory: str | Path | None = None) -> list[Path]:
    """Write ``NAME.png`` and ``NAME.pdf`` with parameters, sweep / run ids and commit embedded."""
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise ValueError(f"figure name {name!r} must be a plain file stem like 'token_pruning_accuracy'")
    out = Path(directory) if directory else FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "params": params or {}, "sweep": sweep, "runs": runs or [], "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    blob = json.dumps(meta, default=str)
    png, pdf = out / f"{name}.png", out / f"{name}.pdf"
    # tight: legends and notes placed outside the axes are part of the figure
    fig.savefig(png, metadata={"mmlab": blob, "Software": "mmlab"}, bbox_inches="tight")
    fig.savefig(pdf, metadata={"Title": name, "Subject": blob, "Creator": "mmlab"}, bbox_inches="tight")
    return [png, pdf]


def provenance(path: str | Path) -> dict:
    """The metadata ``save`` embedded in a PNG or PDF (``params`` holds ``n_samples`` for report figures)."""
    path = Path(path)
    try:
        if path.suffix == ".png":
            from PIL import Image

            return json.loads(Image.open(path).text["mmlab"])
        raw = path.read_bytes()
        start = raw.index(b"/Subject (") + len(b"/Subject (")
        end = raw.index(b")\n", start) if b")\n" in raw[start:] else raw.index(b")", start)
        text = raw[start:end].decode("latin-1").replace("\\(", "(").replace("\\)", ")").replace("\\\\", "\\")
        return json.loads(text)
    except (KeyError, ValueError, AttributeError):
        raise ValueError(f"{path} has no mmlab provenance (it was not written by mmlab.figures.save)") from None
