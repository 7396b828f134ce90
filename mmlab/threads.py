"""Intra-op threads that follow the sweep runner: a run takes the cores other runs give back.

The runner (``mmlab.batch``) writes ``{run_id: threads}`` for the runs in flight to the file named
by ``MMLAB_THREADS_FILE`` whenever a run starts or ends; ``follow()`` (called by the engine at each
prefill and by the weight swap at each calibration block) re-reads it at most once a second and
sets torch's thread count, so the last run of a sweep does not finish on one core.
"""

from __future__ import annotations

import json
import os
import time

import torch

ENV = "MMLAB_THREADS_FILE"
_seen = {"checked": 0.0, "mtime": None}


def follow(min_interval: float = 1.0) -> None:
    path, rid = os.environ.get(ENV), os.environ.get("MMLAB_RUN_ID")
    now = time.monotonic()
    if not path or not rid or now - _seen["checked"] < min_interval:
        return
    _seen["checked"] = now
    try:
        mtime = os.stat(path).st_mtime_ns
        if mtime == _seen["mtime"]:
            return
        _seen["mtime"] = mtime
        n = json.loads(open(path).read()).get(rid)
    except (OSError, ValueError):  # written atomically, but a run may outlive its sweep's file
        return
    if isinstance(n, int) and n >= 1 and n != torch.get_num_threads():
        torch.set_num_threads(n)
