"""``mmlab.record(**metrics)``: how a notebook hands its numbers to the sweep runner.

Inside a sweep, the runner sets ``MMLAB_RECORD_PATH`` for the notebook's kernel; each
call merges the metrics into that JSON file (written atomically). Outside a sweep the
metrics are kept in ``recorded()`` and nothing is written.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

ENV = "MMLAB_RECORD_PATH"
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


def record(**metrics) -> dict:
    """Record scalar metrics for this run; returns everything recorded so far."""
    _session.update({k: _plain(k, v) for k, v in metrics.items()})
    path = os.environ.get(ENV)
    if path:
        p = Path(path)
        current = json.loads(p.read_text()) if p.exists() else {}
        current.update(_session)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=1))
        tmp.replace(p)
    return dict(_session)


def recorded() -> dict:
    return dict(_session)
