"""Sweeps on a real Dask cluster on this machine (``mmlab.cluster``): the same runs and results as
the local pool, a worker killed mid-run, worker resources, and one line for an unreachable scheduler."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmlab.batch import collect, load_sweep, run_sweep
from mmlab.cluster import ClusterError

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
GRID = {"x": [1, 2, 3], "y": [1, 2]}


def sweep_file(tmp_path, name, **spec):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"notebook": "tests/fixtures/grid.ipynb", "output": str(tmp_path / name),
                                 "grid": GRID, **spec}))
    return load_sweep(p, root=ROOT)


def test_local_cluster_runs_the_grid_like_the_local_pool(tmp_path):
    pool = sweep_file(tmp_path, "pool", parameters={"seed": 3})
    dask = sweep_file(tmp_path, "dask", parameters={"seed": 3})
    assert run_sweep(pool, jobs=2, progress=False)["ok"] == 6
    assert run_sweep(dask, progress=False, cluster="local:2") == {"total": 6, "skipped": 0, "ok": 6, "failed": 0}
    assert len(list((tmp_path / "dask").glob("*.json"))) == 6
    a, b = (collect(tmp_path / n).set_index("run_id").sort_index() for n in ("pool", "dask"))
    assert len(b) == 6 and set(b.status) == {"ok"}
    pd.testing.assert_frame_equal(a[["x", "y", "product", "seed"]], b[["x", "y", "product", "seed"]])
    assert (b["product"] == b.x * b.y).all()
    # a rerun on the cluster skips what is done
    assert run_sweep(dask, progress=False, cluster="local:1")["skipped"] == 6


def test_worker_killed_mid_run_every_point_ends_ok_exactly_once(tmp_path):
    """SIGKILL one worker process while it runs a grid point: Dask reschedules the task, the killed
    attempt's papermill dies with its worker (it does not finish beside its copy), nothing half-written
    is left; every run asks for a GPU resource, which these workers offer."""
    log = tmp_path / "done.log"
    sweep = sweep_file(tmp_path, "runs", parameters={"sleep": 4.0, "done_log": str(log)}, resources={"GPU": 1})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  resources={"GPU": 1}) as cluster, distributed.Client(cluster) as client:
        result = {}
        runner = threading.Thread(target=lambda: result.update(
            run_sweep(sweep, progress=False, cluster=cluster.scheduler_address)))
        runner.start()
        victim, deadline = None, time.time() + 120
        while victim is None and time.time() < deadline:  # a worker whose run's notebook is executing
            busy = [w for w, keys in client.processing().items() if keys]
            if busy and list((tmp_path / "runs").glob("*.ipynb.partial")):
                victim = busy[0]
            time.sleep(0.2)
        assert victim, "no run started"
        time.sleep(1.0)  # inside the notebook's sleep
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        runner.join(timeout=300)
    assert not runner.is_alive()
    assert result["ok"] == 6 and result["failed"] == 0
    df = collect(tmp_path / "runs")
    assert len(df) == 6 and set(df.status) == {"ok"} and df.run_id.is_unique
    finished = log.read_text().split()
    assert sorted(finished) == sorted(f"{x},{y}" for x in GRID["x"] for y in GRID["y"]), finished
    assert not list((tmp_path / "runs").glob("*.partial"))


def test_resources_no_worker_offers_is_one_error_before_any_run(tmp_path):
    sweep = sweep_file(tmp_path, "runs", resources={"GPU": 1})
    with pytest.raises(ClusterError, match="no worker offers resource GPU=1"):
        run_sweep(sweep, progress=False, cluster="local:1")
    assert not list((tmp_path / "runs").glob("*.json"))


@pytest.mark.parametrize("address, message", [
    ("tcp://127.0.0.1:9", "cannot reach a Dask scheduler at tcp://127.0.0.1:9 within 5 s"),
    ("nowhere", "give a scheduler address"),
])
def test_unreachable_scheduler_is_one_line(tmp_path, address, message):
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump({"notebook": "tests/fixtures/grid.ipynb", "output": str(tmp_path / "runs"),
                                 "grid": GRID}))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "mmlab.cli", "sweep", str(p), "--cluster", address],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and time.time() - t0 < 60
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
