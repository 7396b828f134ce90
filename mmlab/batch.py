"""Papermill sweeps: ``mmlab sweep sweeps/NAME.yaml`` and ``mmlab collect runs/NAME``.

A sweep YAML names a notebook and a grid::

    notebook: notebooks/01_token_pruning.ipynb
    output: runs/token_pruning          # optional, default runs/NAME
    grid: {method: [fastv, divprune], keep_ratio: [0.11, 0.22, 0.33]}   # cartesian product
    parameters: {n_samples: 100}        # fixed for every run
    timeout: 1800                       # optional, seconds per run
    estimate: 300                       # optional, expected seconds per run (longest runs start first)
    resources: {GPU: 1}                 # optional, what each run needs from a cluster worker (--cluster)

Every run executes the notebook with papermill into ``RUN_ID.ipynb`` and writes
``RUN_ID.json`` (parameters, metrics from ``mmlab.record``, git commit, timings, status).
Files are written under a temporary name and renamed when complete, so a killed sweep
leaves nothing that looks finished; a rerun skips runs whose JSON says ``ok`` and
retries the rest. Each run is its own process with its own kernel, run from a local pool of
threads (``-j N``) or as one task on a Dask cluster (``--cluster ADDRESS``, ``mmlab.cluster``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmlab.figures import git_commit
from mmlab.methods import MethodError, method_class
from mmlab.methods import get as get_method
from mmlab.methods import parse as parse_methods
from mmlab.recording import ENV as RECORD_ENV
from mmlab.recording import ROWS
from mmlab.threads import ENV as THREADS_ENV


class SweepError(ValueError):
    """The sweep file is invalid; raised before any run starts."""


@dataclass
class Sweep:
    name: str
    notebook: Path
    output: Path
    grid: dict[str, list]
    parameters: dict = field(default_factory=dict)
    timeout: float = 1800.0
    estimate: float = 60.0  # expected seconds per run, for scheduling and the ETA
    paper: dict = field(default_factory=dict)  # a paper recipe's reference numbers (``check_paper``)
    resources: dict = field(default_factory=dict)  # Dask worker resources per run, e.g. {"GPU": 1}

    def runs(self) -> list[tuple[str, dict]]:
        """(run id, full parameters) for every point of the grid, in grid order."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            point = dict(zip(keys, values))
            out.append((run_id(point), {**self.parameters, **point}))
        return out


def run_id(point: dict) -> str:
    """Readable and stable: ``method=fastv_keep_ratio=0.11`` (hashed when very long)."""
    text = "_".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in point.items()) or "default"
    text = re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)
    if len(text) > 120:
        text = text[:100] + "_" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return text


def notebook_parameters(path: Path) -> dict:
    """Names and defaults of the notebook's ``parameters`` cell (papermill's own parser)."""
    import papermill

    return {k: v.get("default") for k, v in papermill.inspect_notebook(str(path)).items()}


def load_sweep(path: str | Path, root: str | Path = ".") -> Sweep:
    """Read and validate a sweep YAML; every problem is reported before any run starts."""
    path, root = Path(path), Path(root)
    if not path.exists():
        raise SweepError(f"sweep file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping with keys notebook, grid, parameters, output, timeout, "
                         f"estimate")
    unknown = set(spec) - {"notebook", "grid", "parameters", "output", "timeout", "estimate", "paper", "resources"}
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; "
                         f"valid: notebook, grid, parameters, output, timeout, estimate, paper, resources")
    if "notebook" not in spec:
        raise SweepError(f"{path}: missing 'notebook:' (the .ipynb to run)")
    nb = root / str(spec["notebook"])
    if not nb.exists() or nb.suffix != ".ipynb":
        raise SweepError(f"{path}: notebook {spec['notebook']!r} not found "
                         f"(give a .ipynb path relative to the project)")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: 'grid' must map parameter names to lists of values, got {type(grid).__name__}")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise SweepError(f"{path}: grid entry {k!r} must be a non-empty list of values, got {v!r}")
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise SweepError(f"{path}: 'parameters' must be a mapping of fixed values")
    both = set(grid) & set(params)
    if both:
        raise SweepError(f"{path}: {sorted(both)} appear in both grid and parameters")
    known = notebook_parameters(nb)
    if not known:
        raise SweepError(f"{path}: {spec['notebook']} has no cell tagged 'parameters'")
    bad = sorted((set(grid) | set(params)) - set(known))
    if bad:
        raise SweepError(f"{path}: parameter(s) {bad} not in the parameters cell of {spec['notebook']}; "
                         f"valid: {', '.join(sorted(known))}")
    for point in itertools.product(*grid.values()):  # every run's methods, built as its notebook will build them
        try:
            check_methods({**params, **dict(zip(grid, point))})
        except MethodError as e:
            raise SweepError(f"{path}: {e}") from None
    timeout, estimate = spec.get("timeout", 1800), spec.get("estimate", 60)
    for what, v in (("timeout", timeout), ("estimate", estimate)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise SweepError(f"{path}: {what} must be a positive number of seconds, got {v!r}")
    resources = spec.get("resources") or {}
    if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for k, v in resources.items()):
        raise SweepError(f"{path}: 'resources' must map Dask worker resource names to positive amounts "
                         f"(e.g. {{GPU: 1}}), got {resources!r}")
    name = path.stem
    output = root / str(spec.get("output") or f"runs/{name}")
    return Sweep(name, nb, output, grid, params, float(timeout), float(estimate), check_paper(path, spec.get("paper")),
                 resources)


KNOB_VALUES = ("keep_ratios", "budgets", "keep_ratio", "budget")  # a notebook's value(s) for each method's knob


def check_methods(params: dict) -> None:
    """Build a run's methods from its parameters, as the notebooks do, so that an unknown name or a
    value out of range fails before any run: ``method`` / ``methods`` hold names or spec strings
    (``divprune(keep_ratio=0.098)+snapkv(budget=0.5)``); a bare name takes each value of
    ``keep_ratios`` / ``budgets`` (or the one ``keep_ratio`` / ``budget``) as its knob, and the run's
    other parameters that are its fields (``seed``). Raises MethodError."""
    raw = params.get("methods", params.get("method"))
    for entry in raw if isinstance(raw, list) else [raw]:
        if not isinstance(entry, str) or entry.strip().lower() in ("", "none", "dense"):
            continue
        if not re.fullmatch(r"\w+", entry.strip()):
            parse_methods(entry)
            continue
        cls = method_class(entry.strip())
        fields = {f.name for f in dataclasses.fields(cls)} - set(KNOB_VALUES)
        own = {k: v for k, v in params.items() if k in fields}
        key = next((k for k in KNOB_VALUES if k in params), None)
        values = params[key] if key and isinstance(params[key], list) else [params[key]] if key else [None]
        for v in values:
            get_method(cls.name, **own, **({} if v is None or not cls.knob else {cls.knob: v}))


PAPER_ROW_KEYS = {"tasks", "methods", "metric", "value", "relative", "note"}


def check_paper(path: Path, paper) -> dict:
    """A recipe's ``paper:`` block: ``source`` (where the numbers come from) and ``rows``, each the
    paper's ``value`` of ``metric`` for ``methods`` (a spec) on ``tasks``; ``relative: true`` when the
    value is % of the unmodified model's score averaged over those tasks."""
    if paper is None:
        return {}
    if not isinstance(paper, dict) or not isinstance(paper.get("source"), str) or not isinstance(
            paper.get("rows"), list):
        raise SweepError(f"{path}: 'paper' must map source: <text> and rows: [<reference rows>]")
    for i, row in enumerate(paper["rows"]):
        bad = set(row) - PAPER_ROW_KEYS if isinstance(row, dict) else {"(not a mapping)"}
        if bad or not {"tasks", "methods", "metric", "value"} <= set(row):
            raise SweepError(f"{path}: paper row {i} needs tasks, methods, metric, value (optional relative, "
                             f"note); got {sorted(row) if isinstance(row, dict) else row!r}")
        try:
            parse_methods(row["methods"])
        except MethodError as e:
            raise SweepError(f"{path}: paper row {i}: {e}") from None
    return paper


KERNEL = "mmlab-venv"


_KERNEL_LOCK = threading.Lock()


def kernel_dir() -> Path:
    """A kernelspec bound to *this* interpreter (the project's venv), found through JUPYTER_PATH,
    so sweeps never pick up another environment's ``python3`` kernel and need no manual
    ``jupyter kernelspec install``. Written atomically and only when it changes: parallel runs
    (threads here, other processes elsewhere) never read a half-written spec."""
    d = Path(sys.prefix) / "share" / "mmlab-jupyter"
    spec = d / "kernels" / KERNEL / "kernel.json"
    # one spelling whichever entry point (python, python3, mmlab) runs
    venv_python = Path(sys.prefix) / "bin" / "python"
    exe = str(venv_python) if venv_python.exists() else sys.executable
    want = {"argv": [exe, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (mmlab venv)", "language": "python"}
    with _KERNEL_LOCK:
        try:
            current = json.loads(spec.read_text()) if spec.exists() else None
        except ValueError:
            current = None
        if current != want:
            spec.parent.mkdir(parents=True, exist_ok=True)
            tmp = spec.with_name(f"kernel.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(want))
            tmp.replace(spec)
    return d


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # atomic: the JSON either exists complete or not at all


def is_finished(json_path: Path) -> bool:
    try:
        return json.loads(json_path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


_PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None  # resolved here: nothing is imported after fork
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a run's process before it starts papermill: die with the thread that started it (Linux's
    PR_SET_PDEATHSIG), so a killed runner or cluster worker leaves no run behind that would finish
    a second time beside its rescheduled copy (the kernel follows papermill: ipykernel's parent poller)."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def execute_run(notebook: Path, out_dir: Path, rid: str, params: dict, timeout: float, commit: str,
                sweep: str, threads: int | None = None, threads_file: Path | None = None,
                cwd: Path | None = None, label: str | None = None) -> dict:
    """Run one grid point in its own process (and kernel); returns the JSON it wrote. Each attempt
    writes under its own temporary names: a rescheduled attempt never mixes with a dead one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    attempt = uuid.uuid4().hex[:8]
    nb_partial = out_dir / f"{rid}.{attempt}.ipynb.partial"
    metrics_path = out_dir / f"{rid}.{attempt}.metrics.partial"
    env = {**os.environ, RECORD_ENV: str(metrics_path.resolve()), "MMLAB_RUN_ID": rid, "MMLAB_SWEEP": sweep,
           "JUPYTER_PATH": str(kernel_dir()) + os.pathsep + os.environ.get("JUPYTER_PATH", "")}
    if threads:  # parallel kernels share the cores: oversubscribed OpenMP pools spin against each other
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if threads_file:  # ... and take over the cores of runs that end (mmlab.threads.follow)
        env[THREADS_ENV] = str(threads_file)
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(nb_partial), "-y", json.dumps(params),
           "--kernel", KERNEL, "--cwd", str(cwd or notebook.parent), "--no-progress-bar", "--log-level", "ERROR"]
    t0 = time.time()
    status, error = "ok", None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_die_with_parent if _PRCTL else None)
        if proc.returncode != 0:
            status = "failed"
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            error = next((ln for ln in reversed(lines) if re.match(r"^\w*(Error|Exception)\b", ln.strip())),
                         lines[-1] if lines else f"papermill exited {proc.returncode}")
    except subprocess.TimeoutExpired:
        status, error = "failed", f"timed out after {timeout:.0f} s"
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    except ValueError:
        metrics, status, error = {}, "failed", f"unreadable metrics file {metrics_path.name}"
    metrics_path.unlink(missing_ok=True)
    if nb_partial.exists():
        nb_partial.replace(out_dir / f"{rid}.ipynb")
    result = {"run_id": rid, "sweep": sweep, "status": status, "error": error, "parameters": params,
              "metrics": metrics, "git_commit": commit, "notebook": label or str(notebook),
              "seconds": round(time.time() - t0, 2),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json(out_dir / f"{rid}.json", result)
    return result


class _Cores:
    """The runs in flight and the threads each gets: the cores split evenly among them (the earliest
    started get the remainder), written to a file the runs' kernels follow (``mmlab.threads``)."""

    def __init__(self, path: Path, cores: int):
        self.path, self.cores, self.live, self.lock = path, cores, [], threading.Lock()

    def start(self, rid: str) -> int:
        with self.lock:
            self.live.append(rid)
            return self._write()[rid]

    def end(self, rid: str) -> None:
        with self.lock:
            self.live.remove(rid)
            self._write()

    def _write(self) -> dict:
        base, extra = divmod(self.cores, max(1, len(self.live)))
        alloc = {rid: max(1, base + (i < extra)) for i, rid in enumerate(self.live)}
        _write_json(self.path, alloc)
        return alloc


@dataclass
class _Task:
    sweep: Sweep
    rid: str
    params: dict
    estimate: float  # seconds: the run's last recorded time, else the sweep's estimate


def _tasks(sweep: Sweep) -> list[_Task]:
    """The sweep's unfinished runs (stale partial files of a killed sweep removed first)."""
    sweep.output.mkdir(parents=True, exist_ok=True)
    for stale in sweep.output.glob("*.partial"):  # left by a killed sweep: never counted as results
        stale.unlink()
    out = []
    for rid, p in sweep.runs():
        path = sweep.output / f"{rid}.json"
        if is_finished(path):
            continue
        try:
            last = float(json.loads(path.read_text()).get("seconds") or 0) if path.exists() else 0.0
        except ValueError:
            last = 0.0
        out.append(_Task(sweep, rid, p, last or sweep.estimate))
    return out


def _record_failure(out_dir: Path, rid: str, sweep: str, params: dict, commit: str, error: str) -> dict:
    """The runner itself failed for this run (not the notebook): record it, keep going."""
    res = {"run_id": rid, "sweep": sweep, "status": "failed", "parameters": params, "metrics": {}, "error": error,
           "git_commit": commit, "seconds": 0.0}
    _write_json(out_dir / f"{rid}.json", res)
    return res


def _failed(task: _Task, commit: str, error: str) -> dict:
    return _record_failure(task.sweep.output, task.rid, task.sweep.name, task.params, commit, error)


def _run_task(task: _Task, commit: str, cores: _Cores) -> dict:
    threads = cores.start(task.rid)
    try:
        return execute_run(task.sweep.notebook, task.sweep.output, task.rid, task.params, task.sweep.timeout, commit,
                           task.sweep.name, threads, cores.path)
    except Exception as e:
        return _failed(task, commit, f"runner: {type(e).__name__}: {e}")
    finally:
        cores.end(task.rid)


class _LocalPool:
    """The default: ``jobs`` threads, each waiting on one run's process; the machine's cores are
    split among the runs in flight and follow them as runs end (``mmlab.threads``)."""

    dashboard = None

    def __init__(self, jobs: int):
        self.slots = max(1, jobs)
        self.pool = ThreadPoolExecutor(max_workers=self.slots)
        self.cores = _Cores(Path(tempfile.mkdtemp(prefix="mmlab-threads-")) / "threads.json", os.cpu_count() or 1)

    def submit(self, task: _Task, commit: str):
        return self.pool.submit(_run_task, task, commit, self.cores)

    def running(self, pending) -> int:
        return len(self.cores.live)

    def close(self) -> None:
        self.pool.shutdown()
        self.cores.path.unlink(missing_ok=True)


def _remote_run(job: dict) -> dict:
    """One grid point as a task on a Dask worker: the notebook's text, the resolved parameters and
    the commit travelled with the job; the run writes to the sweep's (shared) output folder."""
    from mmlab.cluster import announce

    threads = announce(job)
    notebook = Path(job["notebook"])
    with tempfile.TemporaryDirectory(prefix="mmlab-run-") as tmp:
        copy = Path(tmp) / notebook.name
        copy.write_text(job["notebook_text"])
        cwd = notebook.parent if notebook.parent.is_dir() else Path(tmp)  # the checkout's folder when shared
        try:
            return execute_run(copy, Path(job["output"]), job["rid"], job["params"], job["timeout"], job["commit"],
                               job["sweep"], threads, cwd=cwd, label=job["notebook"])
        except Exception as e:
            return _record_failure(Path(job["output"]), job["rid"], job["sweep"], job["params"], job["commit"],
                                   f"worker: {type(e).__name__}: {e}")


class _ClusterPool:
    """Each run is one task on a Dask cluster (``mmlab.cluster``); the job carries everything the
    run needs but the project's environment, which the workers share."""

    def __init__(self, spec: str, threads_per_run: int | None):
        from mmlab.cluster import DaskPool

        self.dask = DaskPool(spec, threads_per_run)
        self.slots = max(1, sum(w["nthreads"] for w in self.dask.client.scheduler_info()["workers"].values()))
        self.dashboard = self.dask.dashboard
        self.keys = {}

    def submit(self, task: _Task, commit: str):
        job = {"sweep": task.sweep.name, "rid": task.rid, "params": task.params, "timeout": task.sweep.timeout,
               "output": str(task.sweep.output.resolve()), "notebook": str(task.sweep.notebook.resolve()),
               "notebook_text": task.sweep.notebook.read_text(), "commit": commit}
        key = f"mmlab-{task.sweep.name}-{task.rid}-{uuid.uuid4().hex[:8]}"
        fut = self.dask.submit(_remote_run, job, key, task.sweep.resources)
        self.keys[fut] = key
        return fut

    def running(self, pending) -> int:
        return self.dask.running({self.keys[f] for f in pending})

    def close(self) -> None:
        self.dask.close()


def run_sweeps(sweeps: list[Sweep], jobs: int = 1, progress: bool = True, cluster: str | None = None,
               threads_per_run: int | None = None) -> dict[str, dict]:
    """Every unfinished run of every sweep, the longest (estimated) first: in a local pool of ``jobs``
    workers (the cores split among the runs in flight, following them as runs end), or as tasks on
    the Dask cluster ``cluster`` (``tcp://host:8786`` or ``local:N``; ``mmlab.cluster``). One progress
    display over the whole job (runs done / running / failed / total, ETA). Returns per sweep: counts,
    the summed seconds of its runs and its wall-clock span. Failures are recorded, the rest continue."""
    from tqdm.auto import tqdm

    tasks = sorted((t for sw in sweeps for t in _tasks(sw)), key=lambda t: -t.estimate)
    counts = {sw.name: {"total": len(sw.runs()), "skipped": len(sw.runs()), "ok": 0, "failed": 0, "seconds": 0.0,
                        "first": None, "last": None} for sw in sweeps}
    for t in tasks:
        counts[t.sweep.name]["skipped"] -= 1
    commit = git_commit()
    pool = _ClusterPool(cluster, threads_per_run) if cluster else _LocalPool(jobs)
    if cluster:
        try:  # every sweep's worker resources are on offer before any run starts
            for sw in sweeps:
                pool.dask.check(sw.resources)
        except ValueError:
            pool.close()
            raise
    bar = tqdm(total=len(tasks), desc="runs", unit="run", disable=not progress)
    if pool.dashboard and progress:
        bar.write(f"Dask dashboard: {pool.dashboard}")
    speed = [0.0, 0.0]  # (estimated, measured) seconds of the runs done: scales the ETA
    try:
        futures = {pool.submit(t, commit): t for t in tasks}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            for fut in done:
                task = futures[fut]
                try:
                    res = fut.result()
                except Exception as e:  # the cluster gave up on the task (e.g. its workers kept dying)
                    res = _failed(task, commit, f"cluster: {type(e).__name__}: {e}")
                _tally(counts[task.sweep.name], res)
                if res["status"] != "ok":
                    bar.write(f"FAILED {task.sweep.name}/{res['run_id']}: {res['error']}")
                speed[0] += task.estimate
                speed[1] += res.get("seconds") or 0.0
                bar.update(1)
            left = sum(futures[f].estimate for f in pending) * speed[1] / max(speed[0], 1e-9)
            bar.set_postfix(running=pool.running(pending), failed=sum(v["failed"] for v in counts.values()),
                            eta=f"{left / pool.slots / 60:.0f}min" if speed[0] else "?")
    finally:
        bar.close()
        pool.close()
    for sw in sweeps:  # attempts that died (a killed worker) leave their temporary files: never results
        for stale in sw.output.glob("*.partial"):
            stale.unlink(missing_ok=True)
    return {name: {**{k: v for k, v in c.items() if k not in ("first", "last")},
                   "wall_s": (c["last"] - c["first"]) if c["first"] else 0.0} for name, c in counts.items()}


def _tally(c: dict, res: dict) -> None:
    seconds = res.get("seconds") or 0.0
    c[res["status"]] += 1
    c["seconds"] += seconds
    c["first"] = min(c["first"] or time.time(), time.time() - seconds)
    c["last"] = time.time()


def run_sweep(sweep: Sweep, jobs: int = 1, progress: bool = True, cluster: str | None = None,
              threads_per_run: int | None = None) -> dict:
    """Execute every unfinished run; returns counts. Failures are recorded, the grid continues."""
    c = run_sweeps([sweep], jobs, progress, cluster, threads_per_run)[sweep.name]
    return {k: c[k] for k in ("total", "skipped", "ok", "failed")}


def collect(run_dir: str | Path):
    """All ``RUN_ID.json`` of a sweep -> one tidy table (parameters + metrics, one row per run, or
    one per row of a table the run recorded with ``mmlab.record_rows``),
    written to ``results.csv`` and ``results.parquet`` beside them."""
    import pandas as pd

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SweepError(f"{run_dir} is not a directory of sweep runs")
    rows = []
    for p in sorted(run_dir.glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except ValueError:
            continue
        if "run_id" not in r:
            continue
        metrics = dict(r.get("metrics", {}))
        table = metrics.pop(ROWS, None) or [{}]  # a run that recorded a table gives one row per table row
        for t in table:
            rows.append({"run_id": r["run_id"], "status": r["status"], "error": r.get("error"),
                         **r.get("parameters", {}), **metrics, **t, "seconds": r.get("seconds"),
                         "git_commit": r.get("git_commit")})
    if not rows:
        raise SweepError(f"no run results (*.json) in {run_dir}")
    df = pd.DataFrame(rows)
    df.to_csv(run_dir / "results.csv", index=False)
    # a recorded column may mix types across rows (e.g. group_size 64 and "ch"): parquet needs one
    mixed = [c for c in df.columns if df[c].dtype == object and df[c].dropna().map(type).nunique() > 1]
    df.astype({c: str for c in mixed}).to_parquet(run_dir / "results.parquet", index=False)
    return df
