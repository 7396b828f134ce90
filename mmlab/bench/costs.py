"""The cost of every benchmark answer, read from its Trace, and the per-task summary written next to
a harness's results (lmms-eval and lm-eval report accuracy only).

Per answer: visual tokens entering the LLM (and the mean fraction each layer processed), the LLM's
prefill FLOPs (from the Trace's per-layer token counts), the KV bytes held after prefill and at the
end, prefill ms and decode ms per token (wall-clock of this run), prompt and answer lengths.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmlab.trace import Trace

MEANS = ("visual_tokens", "vision_retention", "prefill_flops", "kv_bytes", "kv_bytes_final", "input_tokens",
         "output_tokens")
MEDIANS = ("prefill_ms", "decode_ms")


def answer_cost(trace: Trace) -> dict:
    """One answer's cost fields."""
    img = trace.image_tokens_per_layer()
    n_in = max(1, trace.n_image_tokens_in)
    return {"visual_tokens": img[0] if img else 0,
            "vision_retention": sum(img) / len(img) / n_in if trace.n_image_tokens_in else float("nan"),
            "prefill_flops": trace.flops["prefill"], "kv_bytes": trace.kv_bytes,
            "kv_bytes_final": trace.kv_bytes_final or trace.kv_bytes,
            "prefill_ms": trace.timings.get("prefill_ms", float("nan")),
            "decode_ms": trace.timings.get("decode_ms_per_token", float("nan")),
            "input_tokens": trace.prompt_length, "output_tokens": len(trace.answer_ids)}


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def summarise(rows: list[dict]) -> dict:
    """Means of the counts and bytes, medians of the times, over one task's answers."""
    out: dict = {"n": len(rows)}
    for k in MEANS:
        vals = _finite(r[k] for r in rows)
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    for k in MEDIANS:
        vals = _finite(r[k] for r in rows)
        out[k] = statistics.median(vals) if vals else float("nan")
    out["tflops"] = out["prefill_flops"] / 1e12
    return out


def cli_output_path() -> Path | None:
    """The harness's ``--output_path`` when it runs from its command line (the sidecar goes next to it)."""
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--output_path" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--output_path="):
            return Path(a.split("=", 1)[1])
    return None


def sidecar_path(costs: str | None) -> Path:
    """``costs`` if given, else ``mmlab_costs_<time>.json`` in the harness's ``--output_path`` (or the
    working directory)."""
    if costs:
        return Path(costs)
    return (cli_output_path() or Path(".")) / f"mmlab_costs_{time.strftime('%Y%m%d_%H%M%S')}.json"


@dataclass
class CostLog:
    """Answers' costs by task; ``write`` replaces the sidecar JSON atomically (never half-written)."""

    meta: dict = field(default_factory=dict)  # model, methods, dtype, device
    rows: list[dict] = field(default_factory=list)

    def add(self, task: str, doc_id, trace: Trace, kind: str = "generate_until") -> None:
        self.rows.append({"task": task, "doc_id": doc_id, "request": kind, **answer_cost(trace)})

    def by_task(self) -> dict[str, dict]:
        tasks = sorted({r["task"] for r in self.rows})
        return {t: summarise([r for r in self.rows if r["task"] == t]) for t in tasks}

    def to_json(self) -> dict:
        return {**self.meta, "tasks": self.by_task(), "samples": self.rows}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1, default=float)
        os.replace(tmp, path)
        return path
