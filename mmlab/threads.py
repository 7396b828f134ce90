"""Intra-op threads that follow the sweep runner: a run takes the cores other runs give back.

The runner (``mmlab.batch``) writes ``{run_id: threads}`` for the runs in flight to the file named
by ``MMLAB_THREADS_FILE`` whenever a run starts or ends; ``follow()`` (called by the engine at each
prefill and by the weight swap at each calibration block) re-reads it at most once a second and
sets torch's thread count, so the last run of a sweep does not finish on one core.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch

ENV = "MMLAB_THREADS_FILE"
_seen = {"checked": 0.0, "mtime": None, "pinned": 0}


def follow(min_interval: float = 1.0) -> None:
    path, rid = os.environ.get(ENV), os.environ.get("MMLAB_RUN_ID")
    now = time.monotonic()
    if not path or not rid or _seen["pinned"] or now - _seen["checked"] < min_interval:
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


@contextlib.contextmanager
def pinned(n: int | None):
    """Run the body on exactly ``n`` intra-op threads (``None``: leave them as they are), whatever
    the runner offers meanwhile: BLAS reductions split differently across threads, and a chaotic
    computation (GPTQ's rounding cascade) turns those last-bit differences into different results."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    _seen["pinned"] += 1
    torch.set_num_threads(n)
    try:
        yield
    finally:
        _seen["pinned"] -= 1
        torch.set_num_threads(before)
        _seen["mtime"] = None  # pick the runner's current offer up again at the next follow()
