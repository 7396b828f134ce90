"""Sweeps on a Dask cluster: ``mmlab sweep grid.yaml --cluster tcp://host:8786`` (or ``local:N``).

A leaf module: it knows Dask (``dask.distributed``), not mmlab. ``mmlab.batch`` hands it a function
and one self-contained job per grid point; each job runs as one Dask task on a worker, whose own
papermill process writes the run's files to the sweep's output folder. Workers must therefore
share that folder with the machine that submits (a shared filesystem) and have the project's
environment installed (same venv, same ``mmlab``). Dask reschedules a task whose worker dies
(up to ``distributed.scheduler.allowed-failures`` times); ``mmlab.batch`` makes every attempt
write under its own temporary names, so a re-run attempt never mixes with a dead one.

Worker resources: a sweep's ``resources: {GPU: 1}`` becomes the task's Dask resources, so a worker
started with ``--resources GPU=1`` (one per GPU, each with its own ``CUDA_VISIBLE_DEVICES``) runs
one run at a time.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections import defaultdict

TOPIC = "mmlab-run-started"  # workers log one event per attempt: the progress display's "running"
CONNECT_TIMEOUT = 5  # seconds to reach a scheduler before giving up with one line


class ClusterError(ValueError):
    """The cluster could not be reached or cannot run the sweep; raised before any run starts."""


class DaskPool:
    """A Dask client (and, for ``local:N``, its LocalCluster) that runs sweep jobs as tasks.

    ``threads_per_run``: intra-op threads of each run; by default each worker host's cores split
    evenly among the task slots (worker threads) on that host."""

    def __init__(self, spec: str, threads_per_run: int | None = None):
        from distributed import Client, LocalCluster

        self.cluster = None
        m = re.fullmatch(r"local:(\d+)", spec)
        if m:
            n = int(m.group(1))
            if n < 1:
                raise ClusterError(f"--cluster {spec}: local:N needs N >= 1 worker processes")
            self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                        dashboard_address=":0" if _has_dashboard() else None)
            address = self.cluster.scheduler_address
        elif re.fullmatch(r"(\w+://)?[\w.\-\[\]:]+:\d+", spec):
            address = spec
        else:
            raise ClusterError(f"--cluster {spec!r}: give a scheduler address (tcp://host:8786) or local:N")
        try:
            self.client = Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            self.close()
            raise ClusterError(f"cannot reach a Dask scheduler at {address} within {CONNECT_TIMEOUT} s "
                               f"({type(e).__name__}); start one with `dask scheduler` and workers with "
                               f"`dask worker {address}`, or use --cluster local:N") from None
        self.threads = self._threads(threads_per_run)

    @property
    def dashboard(self) -> str | None:
        """The scheduler's dashboard link, when it serves one (needs bokeh on the scheduler)."""
        services = self.client.scheduler_info().get("services", {})
        return self.client.dashboard_link if "dashboard" in services else None

    def _threads(self, fixed: int | None) -> dict[str, int]:
        """{worker address: threads per run}: the host's cores over the worker threads on that host."""
        workers = self.client.scheduler_info()["workers"]
        if fixed:
            return {w: fixed for w in workers}
        cores = self.client.run(os.cpu_count)
        slots = defaultdict(int)
        for w, info in workers.items():
            slots[info["host"]] += info["nthreads"]
        return {w: max(1, (cores.get(w) or 1) // slots[info["host"]]) for w, info in workers.items()}

    def check(self, resources: dict) -> None:
        """Every resource a sweep asks for is offered by some worker (else its runs would wait forever)."""
        workers = self.client.scheduler_info()["workers"]
        if not workers:
            raise ClusterError("the Dask scheduler has no workers; start them with `dask worker ADDRESS`")
        offered = [info.get("resources", {}) for info in workers.values()]
        for name, amount in resources.items():
            if not any(o.get(name, 0) >= amount for o in offered):
                raise ClusterError(f"no worker offers resource {name}={amount}; start workers with "
                                   f"`dask worker ADDRESS --resources {name}={amount}`")

    def submit(self, fn, job: dict, key: str, resources: dict):
        """A ``concurrent.futures.Future`` of ``fn(job)`` run as one Dask task."""
        executor = self.client.get_executor(pure=False, resources=resources or None)
        return executor.submit(fn, {**job, "task_key": key, "threads_by_worker": self.threads}, key=key)

    def running(self, keys: set[str]) -> int:
        """How many of ``keys`` a worker has started and not finished (from the workers' events)."""
        started = {msg.get("key") for _, msg in self.client.get_events(TOPIC)}
        return len(started & keys)

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def announce(job: dict) -> int | None:
    """On the worker, as a task starts: log the start (progress display) and return this worker's
    threads per run (``None`` outside a worker)."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return None
    worker.log_event(TOPIC, {"key": job.get("task_key")})
    return job.get("threads_by_worker", {}).get(worker.address)


def _has_dashboard() -> bool:
    """The dashboard needs bokeh (the ``cluster`` extra installs it)."""
    return importlib.util.find_spec("bokeh") is not None
