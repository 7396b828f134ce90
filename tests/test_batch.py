"""The sweep runner: validation before any run, failures recorded, resumable after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmlab.batch import SweepError, collect, load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = "tests/fixtures/grid.ipynb"


def write_sweep(tmp_path, **spec):
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump({"notebook": FIXTURE, "output": str(tmp_path / "runs"), **spec}))
    return p


@pytest.mark.parametrize("spec, message", [
    ({"notebook": "notebooks/missing.ipynb", "grid": {"x": [1]}}, "not found"),
    ({"grid": {"nope": [1, 2]}},
     r"parameter\(s\) \[.nope.\] not in the parameters cell .* valid: done_log, fail_on, n_samples"),
    ({"grid": {"x": 3}}, "must be a non-empty list"),
    ({"grid": [1, 2]}, "'grid' must map parameter names"),
    ({"grid": {"x": [1]}, "parameters": {"x": 2}}, "appear in both grid and parameters"),
    ({"grid": {"x": [1]}, "colour": 1}, "unknown key"),
    ({"grid": {"x": [1]}, "resources": {"GPU": 0}}, "'resources' must map Dask worker resource names"),
])
def test_invalid_sweeps_rejected_before_running(tmp_path, spec, message):
    p = write_sweep(tmp_path, **{k: v for k, v in spec.items()})
    with pytest.raises(SweepError, match=message):
        load_sweep(p, root=ROOT)
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("notebook, spec, message", [
    ("notebooks/00_baseline.ipynb", {"grid": {"keep_ratio": [0.5, 1.5]}, "parameters": {"method": "fastv"}},
     r"keep_ratio must be in \(0, 1\], got 1.5"),
    ("notebooks/00_baseline.ipynb", {"grid": {"method": ["random", "fastvv"]}}, "unknown method 'fastvv'"),
    ("notebooks/00_baseline.ipynb", {"grid": {"method": ["pdrop"]}, "parameters": {"keep_ratio": 0}},
     r"ratio must be in \(0, 1\], got 0"),
    ("notebooks/01_token_pruning.ipynb", {"grid": {"methods": [["random"], ["h2o"]]},
                                          "parameters": {"keep_ratios": [0.5, 2.0]}}, "got 2.0"),
    ("notebooks/02_kv_merging.ipynb", {"grid": {"methods": [["h2o"]]}, "parameters": {"budgets": [-1]}},
     "budget must be"),
    ("notebooks/06_benchmarks.ipynb", {"grid": {"methods": ["none", "divprune(keep_ratio=7)"]}}, "got 7"),
])
def test_method_values_rejected_before_running(tmp_path, notebook, spec, message):
    """Each run's methods are built as its notebook builds them, at validation, not ~10 s later in a kernel."""
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump({"notebook": notebook, "output": str(tmp_path / "runs"), **spec}))
    with pytest.raises(SweepError, match=message):
        load_sweep(p, root=ROOT)
    assert not (tmp_path / "runs").exists()


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("notebook: [unclosed\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(p, root=ROOT)


def test_cli_rejects_invalid_sweep_in_one_line(tmp_path):
    p = write_sweep(tmp_path, grid={"nope": [1]})
    out = subprocess.run([sys.executable, "-m", "mmlab.cli", "sweep", str(p)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "not in the parameters cell" in out.stderr


def test_failing_run_recorded_and_others_finish(tmp_path):
    p = write_sweep(tmp_path, grid={"x": [1, 2, 3]}, parameters={"fail_on": 2})
    sweep = load_sweep(p, root=ROOT)
    counts = run_sweep(sweep, jobs=2, progress=False)
    assert counts == {"total": 3, "skipped": 0, "ok": 2, "failed": 1}
    bad = json.loads((tmp_path / "runs" / "x=2.json").read_text())
    assert bad["status"] == "failed" and "deliberate failure at x=2" in bad["error"]
    good = json.loads((tmp_path / "runs" / "x=3.json").read_text())
    assert good["metrics"]["product"] == 3 and good["git_commit"]
    assert (tmp_path / "runs" / "x=3.ipynb").exists()
    df = collect(tmp_path / "runs")
    assert sorted(df.status) == ["failed", "ok", "ok"]
    assert (tmp_path / "runs" / "results.parquet").exists()


def test_sweep_killed_midway_resumes_exactly_once(tmp_path):
    """12 runs with -j 2; SIGKILL the whole sweep (runner, workers, kernels) mid-way; rerun."""
    p = write_sweep(tmp_path, grid={"x": [1, 2, 3, 4], "y": [1, 2, 3]}, parameters={"sleep": 0.5})
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mmlab.cli", "sweep", str(p), "-j", "2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(runs.glob("*.json"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {q.name for q in runs.glob("*.json")}
    assert 3 <= len(done_before) < 12, "the kill should land mid-sweep"
    for q in runs.glob("*.json"):  # whatever exists is complete
        assert json.loads(q.read_text())["status"] == "ok"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{len(done_before)} already done" in again.stdout
    df = pd.read_csv(runs / "results.csv")
    assert len(df) == 12 and df.run_id.is_unique and set(df.status) == {"ok"}
    assert sorted(zip(df.x, df.y)) == [(x, y) for x in range(1, 5) for y in range(1, 4)]
    assert (df["product"] == df.x * df.y).all()
    assert not list(runs.glob("*.partial"))


def test_record_outside_a_sweep_and_bad_values(monkeypatch, tmp_path):
    import mmlab

    monkeypatch.delenv("MMLAB_RECORD_PATH", raising=False)
    assert mmlab.record(accuracy=0.5)["accuracy"] == 0.5
    with pytest.raises(TypeError, match="must be a number"):
        mmlab.record(table=[1, 2])
    monkeypatch.setenv("MMLAB_RECORD_PATH", str(tmp_path / "m.json"))
    mmlab.record(tflops=1.5)
    assert json.loads((tmp_path / "m.json").read_text())["tflops"] == 1.5


def test_recorded_table_becomes_one_result_row_per_table_row(monkeypatch, tmp_path):
    import pandas as pd

    import mmlab
    from mmlab.batch import collect

    monkeypatch.setenv("MMLAB_RECORD_PATH", str(tmp_path / "m.json"))
    mmlab.record(n=3)
    assert mmlab.record_rows(pd.DataFrame({"method": ["a", "b"], "accuracy": [0.5, 0.75]})) == 2
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["_rows"][1] == {"method": "b", "accuracy": 0.75} and metrics["n"] == 3
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "seed=0.json").write_text(json.dumps({"run_id": "seed=0", "status": "ok", "parameters": {"seed": 0},
                                                  "metrics": metrics}))
    df = collect(runs)
    assert df[["seed", "n", "method", "accuracy"]].values.tolist() == [[0, 3, "a", 0.5], [0, 3, "b", 0.75]]
    with pytest.raises(TypeError, match="must be a number"):
        mmlab.record_rows([{"x": [1]}])


def test_kernelspec_is_rewritten_atomically_under_parallel_runs():
    """Runs started together (threads) must never read a half-written kernel.json: a stale spec
    written by another entry point (python3 vs python) used to be rewritten in place while a
    parallel run was reading it."""
    from concurrent.futures import ThreadPoolExecutor

    from mmlab.batch import KERNEL, kernel_dir

    spec = kernel_dir() / "kernels" / KERNEL / "kernel.json"
    good = spec.read_text()
    for _ in range(5):
        spec.write_text(good.replace('"language"', '"stale": 1, "language"'))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: kernel_dir(), range(32)))
        assert spec.read_text() == good


def test_every_committed_sweep_validates():
    """Default sweeps and the ones kept aside (sweeps/smol: run once smol-llava meets its bars) name
    notebook parameters that exist and methods that build (``load_sweep`` checks every grid point)."""
    sweeps = sorted((ROOT / "sweeps").glob("*.yaml")) + sorted((ROOT / "sweeps" / "smol").glob("*.yaml"))
    assert len(sweeps) >= 14
    for y in sweeps:
        assert load_sweep(y, root=ROOT).runs()
