"""The field's own benchmark harnesses, without a fork: an lmms-eval model (``mmlab``, found through
lmms-eval's plugin entry point), an lm-eval model for text tasks, and the cost of every answer
next to its accuracy.

    from mmlab import bench
    df = bench.lmms_eval("tiny-llava", ["mmlab_shapes"], methods="divprune(keep_ratio=0.1)", limit=50)
    df = bench.lm_eval("smollm2-135m", ["piqa"], methods="rtn(bits=8)", limit=100)   # needs the hub for piqa

Both harnesses come with ``make bench-deps`` (pinned, without a CUDA torch); ``import mmlab`` never
imports them. ``tasks_dir()`` writes mmlab's own lmms-eval tasks (``mmlab_shapes``,
``mmlab_shapes_multi``) with their parquet data, for ``lmms-eval --include_path``.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import tempfile
from pathlib import Path

from mmlab.models import cache_dir

TASKS = Path(__file__).parent / "tasks"
TASK_SETS = {"mmlab_shapes": ("shapes_test.parquet", 400), "mmlab_shapes_multi": ("shapes_multi_test.parquet", 100)}


def _missing(package: str):
    return ImportError(f"{package} is not installed; run `make bench-deps` (pinned lmms-eval + lm-eval)")


def _shapes_parquet(path: Path, n: int, multi: bool) -> None:
    import datasets

    from mmlab.data import multi_image, shapes

    samples = multi_image(n, seed=0, split="test") if multi else shapes(n, seed=0, split="test")
    image = datasets.Image()
    cols = {"question_id": [s.uid for s in samples], "question": [s.question for s in samples],
            "answer": [s.answer for s in samples], "qtype": [s.qtype for s in samples]}
    feats = {k: datasets.Value("string") for k in cols}
    if multi:
        cols["images"], feats["images"] = [s.images for s in samples], datasets.Sequence(image)
    else:
        cols["image"], feats["image"] = [s.image for s in samples], image
    datasets.Dataset.from_dict(cols, features=datasets.Features(feats)).to_parquet(str(path))


def tasks_dir(root: str | Path | None = None) -> Path:
    """A folder of mmlab's lmms-eval tasks (YAML + the test split as parquet), written once per
    version of the YAMLs under ``$MMLAB_CACHE/lmms_tasks`` (atomically: a half-written folder is
    never used). Pass it to lmms-eval as ``--include_path``."""
    yamls = sorted(TASKS.glob("*.yaml"))
    from mmlab.data.shapes import make_sample

    sources = [*yamls, Path(inspect.getsourcefile(make_sample))]  # a new data generator or YAML: a new folder
    key = hashlib.sha1(b"".join(p.read_bytes() for p in sources)).hexdigest()[:10]
    out = Path(root or cache_dir() / "lmms_tasks") / key
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".part-"))
    try:
        for y in yamls:
            (tmp / y.name).write_text(y.read_text().replace("DATA/", f"{out}/"))
        for name, (file, n) in TASK_SETS.items():
            _shapes_parquet(tmp / file, n, multi=name.endswith("multi"))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _rows(results: dict, costs: dict, meta: dict) -> list[dict]:
    """One row per (task, metric) of a harness's results dict, with the task's mean costs."""
    rows = []
    for task, res in results.get("results", {}).items():
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if metric == "alias" or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = res.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                         **meta, **costs.get(task, {})})
    return rows


def lmms_eval(model, tasks: list[str] | str, methods: str = "", *, limit: int | float | None = None,
              include_path: list[str] | str | None = None, seed: int = 0, **model_args):
    """Run lmms-eval ``tasks`` with the ``mmlab`` model on ``model`` (a name / path, or a loaded Bundle)
    under ``methods`` (a spec string); returns a DataFrame, one row per (task, metric), with each
    task's answer costs (visual tokens, TFLOPs, KV bytes, prefill / decode ms, n). mmlab's own tasks
    (``tasks_dir()``) are always included; ``include_path`` adds other task folders."""
    try:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
    except ImportError:
        raise _missing("lmms-eval") from None

    from mmlab.bench.lmms_model import MMLab

    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    paths = [str(tasks_dir())] + ([include_path] if isinstance(include_path, str) else list(include_path or []))
    manager = TaskManager("ERROR", include_path=paths, model_name="mmlab")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lmms-eval task(s) {unknown}; mmlab's own: {', '.join(TASK_SETS)} "
                         f"(others: `lmms-eval --tasks list`, or add their folder with include_path)")
    lm = MMLab(pretrained=model, methods=methods, **model_args)
    return _evaluate(simple_evaluate, lm, tasks, limit, seed, task_manager=manager, verbosity="ERROR")


def lm_eval(model, tasks: list[str] | str, methods: str = "", *, limit: int | float | None = None,
            include_path: list[str] | str | None = None, num_fewshot: int | None = None, seed: int = 0,
            **model_args):
    """Run lm-evaluation-harness ``tasks`` with the ``mmlab`` text model (``mmlab.bench.lm_model``)
    on ``model`` under ``methods``; a DataFrame like ``lmms_eval``'s, with each task's costs."""
    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise _missing("lm-eval") from None

    from mmlab.bench.lm_model import MMLabLM

    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks`, or add their folder with "
                         f"include_path")
    lm = MMLabLM(pretrained=model, methods=methods, **model_args)
    return _evaluate(simple_evaluate, lm, tasks, limit, seed, task_manager=manager, num_fewshot=num_fewshot)


def _evaluate(simple_evaluate, lm, tasks: list[str], limit, seed: int, **kw):
    """A harness's ``simple_evaluate`` on the mmlab model ``lm``, as a DataFrame with each task's costs
    (the sidecar goes to a temporary folder: the costs are in the frame)."""
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="mmlab-costs-") as tmp:
        lm.costs_path = Path(tmp) / "costs.json"
        out = simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=False, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, **kw)
    meta = {"model": lm.bundle.name, "methods": lm.server.costs.meta["methods"], "limit": limit}
    return pd.DataFrame(_rows(out, lm.server.costs.by_task(), meta))
