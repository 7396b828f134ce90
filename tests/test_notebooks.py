"""Every notebook: committed clean, has seed + n_samples parameters, executes with small parameters."""

import json
import os
from pathlib import Path

import papermill
import pytest

from mmlab.batch import KERNEL, kernel_dir, notebook_parameters

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SMALL = {"n_samples": 4}
# notebooks whose other parameters also need shrinking to run in seconds
SMALLER = {"02_kv_merging.ipynb": {"needle_lengths": [256], "needle_depths": [0.5], "needle_per_cell": 1,
                                   "ppl_windows": 1, "window": 512, "context": 384, "budgets": [0.5]},
           "03_mod_ratios.ipynb": {"calibration": 2, "constant_ratios": [0.5]},
           "04_quantization.ipynb": {"bits": [4], "group_sizes": [None, 128], "calibrated": ["gptq"],
                                     "calibrated_bits": [3], "calibrated_groups": [64], "extended": False,
                                     "calib_samples": 2, "windows": 1, "tiny_bits": [4], "kv_bits": [4],
                                     "kv_window": 512, "kv_context": 384, "kv_windows": 1,
                                     "torchao_check": False}}


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"00_baseline.ipynb", "05_explorer.ipynb"}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_parameterized(nb):
    data = json.loads(nb.read_text())
    for cell in data["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{nb.name}: strip outputs"
    params = notebook_parameters(nb)
    assert {"seed", "n_samples"} <= set(params), f"{nb.name}: parameters cell needs seed and n_samples"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(nb, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir()) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("MMLAB_RECORD_PATH", str(tmp_path / "metrics.json"))
    out = tmp_path / nb.name
    papermill.execute_notebook(str(nb), str(out), parameters={**SMALL, **SMALLER.get(nb.name, {})}, kernel_name=KERNEL, cwd=str(nb.parent),
                               progress_bar=False)
    assert out.exists()
