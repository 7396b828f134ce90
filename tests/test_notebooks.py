"""Every notebook: committed clean, has seed + n_samples parameters, executes with small parameters,
records the metrics and tables its sweep collects, and those tables redraw its report figures."""

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import papermill  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from mmlab import report  # noqa: E402
from mmlab.batch import KERNEL, kernel_dir, notebook_parameters  # noqa: E402
from mmlab.recording import ROWS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SMALL = {"n_samples": 4}
# notebooks whose other parameters also need shrinking to run in seconds
SMALLER = {"02_kv_merging.ipynb": {"needle_lengths": [256], "needle_depths": [0.5], "needle_per_cell": 1,
                                   "ppl_windows": 1, "window": 512, "context": 384, "budgets": [0.5]},
           "03_mod_ratios.ipynb": {"calibration": 2, "constant_ratios": [0.5]},
           "04_quantization.ipynb": {"bits": [4], "group_sizes": [None, 64], "calibrated": ["gptq"],
                                     "calibrated_bits": [4], "calibrated_groups": [64],
                                     "sections": ["weights", "activations", "kernels", "tiny_llava", "kv_cache"],
                                     "calib_samples": 2, "windows": 1, "tiny_bits": [4], "kv_bits": [4],
                                     "kv_window": 512, "kv_context": 384, "kv_windows": 1,
                                     "torchao_check": False},
           "07_yopo.ipynb": {"windows": [3], "head_keeps": [0.5], "layer_cuts": [0.5], "n_calibration": 2},
           "08_dynamic_llava.ipynb": {"n_samples": 2, "prompt": 32, "max_new_tokens": 6, "window": 64, "context": 56,
                                      "n_windows": 1, "rates": []},
           "09_dpn.ipynb": {"static_kernels": [2]}}


# what each notebook hands to its sweep: scalar metrics, and the tasks of its recorded table
RECORDS = {"00_baseline.ipynb": ({"accuracy", "tflops", "kv_bytes", "acc_color", "acc_count"}, set()),
           "01_token_pruning.ipynb": ({"dense_accuracy", "image_attention_share_l0", "image_attention_share_l3"},
                                      {"pruning", "attention_share", "kept_tokens"}),
           "02_kv_merging.ipynb": ({"adjacent_above_threshold_text", "adjacent_above_threshold_images"},
                                   {"perplexity", "needle", "multi_image", "lookm_multi_image", "lookm_needle",
                                    "key_similarity"}),
           "03_mod_ratios.ipynb": ({"arank_chosen", "target_retention", "dense_accuracy", "arank_l0"},
                                   {"arank", "configs", "routed"}),
           "04_quantization.ipynb": (set(), {"weights", "weights_activations", "tiny_llava", "kv_cache"}),
           "05_explorer.ipynb": (set(), set()),
           "06_benchmarks.ipynb": (set(), {"mmlab_shapes"}),
           "07_yopo.ipynb": ({"dense_accuracy"}, {"cuts", "heads"}),
           "08_dynamic_llava.ipynb": ({"dense_perplexity", "dense_perplexity_prose"}, {"generation", "perplexity"}),
           "09_dpn.ipynb": ({"dense_accuracy", "router_accuracy"}, {"grid", "routing"})}


CELL_TIMEOUT = 900  # seconds per cell: a lost kernel reply fails the test instead of hanging CI


def _sweep_of(nb: Path) -> str | None:
    for y in sorted((ROOT / "sweeps").glob("*.yaml")):
        if Path(yaml.safe_load(y.read_text())["notebook"]).name == nb.name:
            return y.stem
    return None


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
    papermill.execute_notebook(str(nb), str(out), parameters={**SMALL, **SMALLER.get(nb.name, {})}, kernel_name=KERNEL,
                               cwd=str(nb.parent), progress_bar=False, execution_timeout=CELL_TIMEOUT)
    recorded = json.loads((tmp_path / "metrics.json").read_text()) if (tmp_path / "metrics.json").exists() else {}
    metrics, tasks = RECORDS[nb.name]
    assert metrics <= set(recorded), f"{nb.name} did not record {sorted(metrics - set(recorded))}"
    rows = pd.DataFrame(recorded.get(ROWS, []))
    got = set(rows.get("task", pd.Series(dtype=str)).dropna())
    assert tasks == got, f"{nb.name} recorded tasks {got}, expected {tasks}"
    # `mmlab figures` redraws this sweep's report figures from exactly such a table
    for name, (sweep, draw) in report.FIGURES.items():
        if sweep == _sweep_of(nb) and not rows.empty:
            plt.close(draw(rows.assign(status="ok")))


def _execute(name: str, params: dict, tmp_path, monkeypatch) -> pd.DataFrame:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir()) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("MMLAB_RECORD_PATH", str(tmp_path / "metrics.json"))
    nb = ROOT / "notebooks" / name
    papermill.execute_notebook(str(nb), str(tmp_path / name), parameters=params, kernel_name=KERNEL,
                               cwd=str(nb.parent), progress_bar=False, execution_timeout=CELL_TIMEOUT)
    return pd.DataFrame(json.loads((tmp_path / "metrics.json").read_text())[ROWS])


def test_pruning_notebook_on_the_deep_model(tmp_path, monkeypatch):
    """The tiny-llava-deep sweep's notebook: the model parameter reaches every table and figure title."""
    rows = _execute("01_token_pruning.ipynb", {"model": "tiny-llava-deep", "n_samples": 2,
                                               "methods": ["random", "fastv"], "keep_ratios": [0.5]},
                    tmp_path, monkeypatch)
    assert set(rows.task) == {"pruning", "attention_share", "kept_tokens"}
    shares = rows[rows.task == "attention_share"]
    assert shares.layer.max() == 11 and set(shares.model) == {"tiny-llava-deep"}
    fig = report.pruning_accuracy(rows.assign(status="ok", model="tiny-llava-deep"))
    assert fig.axes[0].get_title().startswith("tiny-llava-deep")
    plt.close(fig)


def test_kv_notebook_runs_one_section(tmp_path, monkeypatch):
    """``sections`` runs only the multi-image task (what the smol-llava KV sweep asks for)."""
    rows = _execute("02_kv_merging.ipynb", {"sections": ["multi_image"], "n_samples": 2, "budgets": [0.5],
                                            "methods": ["h2o", "lookm"], "lookm_variants": ["no-prior"]},
                    tmp_path, monkeypatch)
    assert set(rows.task) == {"multi_image", "lookm_multi_image", "key_similarity"}
