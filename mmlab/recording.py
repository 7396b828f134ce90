"""``mmlab.record(**metrics)`` / ``mmlab.record_rows(table)``: how a notebook hands its
numbers to the sweep runner.

Inside a sweep, the runner sets ``MMLAB_RECORD_PATH`` for the notebook's kernel; each
call merges the metrics into that JSON file (written atomically), with the kernel's peak RSS. Outside a sweep the
metrics are kept in ``recorded()`` and nothing is written.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

ENV = "MMLAB_RECORD_PATH"
ROWS = "_rows"  # key of a recorded table in the metrics file
_session: dict = {}


def _plain(name: str, value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        return v if math.isfinite(v) else str(v)
    if hasattr(value, "item"):  # 0-d tensors / numpy scalars
        return _plain(name, value.item())
    raise TypeError(f"record(): {name} must be a number, string, bool or None, got {type(value).__name__}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write() -> None:
    path = os.environ.get(ENV)
    if path:
        p = Path(path)
        current = json.loads(p.read_text()) if p.exists() else {}
        current.update(_session)
        current["peak_rss_mb"] = peak_rss_mb()  # the kernel's memory high-water mark at its last record
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=1))
        tmp.replace(p)


def record(**metrics) -> dict:
    """Record scalar metrics for this run; returns everything recorded so far."""
    _session.update({k: _plain(k, v) for k, v in metrics.items()})
    _write()
    return {k: v for k, v in _session.items() if k != ROWS}


def record_rows(rows) -> int:
    """Record a table (a DataFrame or a list of dicts of scalars) for this run; ``mmlab collect``
    writes one result row per table row, beside the run's parameters. Returns the row count."""
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict(orient="records")
    missing = lambda v: isinstance(v, float) and math.isnan(v)  # noqa: E731  (a DataFrame's empty cell)
    _session[ROWS] = [{str(k): _plain(str(k), v) for k, v in dict(r).items() if not missing(v)} for r in rows]
    _write()
    return len(_session[ROWS])


def recorded() -> dict:
    return {k: v for k, v in _session.items() if k != ROWS}
