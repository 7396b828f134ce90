"""The benchmark harnesses, offline: lmms-eval's real evaluator with the ``mmlab`` model on fixture
tasks in the real data sets' schemas, harness-level ground truth against lmms-eval's own
``llava_hf`` and lm-eval's own ``hf`` model, ``mmlab_shapes`` against ``mmlab eval``, the cost
sidecar, and the one-line errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import mmlab
from mmlab import bench
from mmlab.methods import MethodError, parse, spec

sys.path.insert(0, str(Path(__file__).parent))
import bench_fixtures  # noqa: E402

pytest.importorskip("lmms_eval", reason="make bench-deps installs lmms-eval")
pytest.importorskip("lm_eval", reason="make bench-deps installs lm-eval")

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_tasks")
    return root, bench_fixtures.write_all(root) + [bench_fixtures.write_shapes_mc(root)]


# --- the method-spec syntax ----------------------------------------------------------------------
def test_spec_round_trips_every_method():
    for name in mmlab.methods.available():
        ms = parse(name)
        assert parse(spec(ms)) == ms
    ms = parse("divprune(keep_ratio=0.098)+snapkv(budget=0.5)")
    assert [m.name for m in ms] == ["divprune", "snapkv"] and ms[0].keep_ratio == 0.098 and ms[1].budget == 0.5
    assert parse("") == parse("none") == []


@pytest.mark.parametrize("bad,says", [("divprune(0.1)", "by name"), ("nosuch(keep_ratio=1)", "unknown method"),
                                      ("divprune(keep=0.1)", "valid: keep_ratio"), ("divprune(keep_ratio=x)",
                                                                                    "not a literal"),
                                      ("divprune(", "not valid"), ("divprune()*2", "is not name(")])
def test_bad_specs_get_one_line(bad, says):
    with pytest.raises(MethodError, match=None) as e:
        parse(bad)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_cli_and_sweep_take_the_spec(tmp_path):
    out = subprocess.run([VENV_BIN / "mmlab", "eval", "--methods", "divprune(keep_ratio=2", "--n-samples", "2"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "not valid" in out.stderr and "Traceback" not in out.stderr
    from mmlab.batch import SweepError, load_sweep

    y = tmp_path / "s.yaml"
    y.write_text("notebook: notebooks/06_benchmarks.ipynb\ngrid:\n  methods: ['none', 'divprune(keep=1)']\n")
    with pytest.raises(SweepError, match="divprune has no parameter keep"):
        load_sweep(y, root=Path(__file__).parents[1])


# --- lmms-eval -----------------------------------------------------------------------------------
def test_plugin_is_found_through_the_entry_point():
    from lmms_eval.models import get_model

    from mmlab.bench.lmms_model import MMLab

    assert get_model("mmlab") is MMLab


def test_mmlab_shapes_equals_mmlab_eval(tiny):
    n = 24
    samples = mmlab.data.shapes(n=n, seed=0, split="test")
    for methods in ("", "divprune(keep_ratio=0.25)"):
        df = bench.lmms_eval(tiny, ["mmlab_shapes"], methods, limit=n)
        row = df[df.metric == "accuracy"].iloc[0]
        ref = mmlab.evaluate(tiny, samples, parse(methods), progress=False)
        assert row.value == pytest.approx(ref.accuracy) and row.n == n
        assert row.prefill_flops == pytest.approx(ref.flops) and row.kv_bytes == pytest.approx(ref.kv_bytes)


def test_fixture_tasks_through_the_real_evaluator(tiny, fixtures):
    root, tasks = fixtures
    dense = bench.lmms_eval(tiny, tasks, limit=6, include_path=str(root))
    pruned = bench.lmms_eval(tiny, tasks, "divprune(keep_ratio=0.1)", limit=6, include_path=str(root))
    got = set(zip(dense.task, dense.metric))
    assert {("fixture_pope", "pope_accuracy"), ("fixture_pope", "pope_f1_score"), ("fixture_gqa", "exact_match"),
            ("fixture_mme", "mme_perception_score"), ("fixture_sqa_img", "exact_match"), ("fixture_mc", "acc")} <= got
    mme = dense[dense.metric == "mme_perception_score"].value.iloc[0]
    assert 0 <= mme <= 200  # MME's paired score: acc + acc+ per image
    for df in (dense, pruned):
        assert ((df.value >= 0) & df.stderr.apply(lambda s: math.isnan(s) or s >= 0)).all()
    assert (dense.visual_tokens == 144).all() and (pruned.visual_tokens == 14).all()
    assert (pruned.tflops < dense.tflops).all()
    mc = dense[dense.task == "fixture_mc"].iloc[0]
    assert mc.n == 12 and mc.value == 1.0  # 6 docs x 2 choices scored; tiny-llava names the colour


@pytest.mark.parametrize("arch", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_fixture_tasks_on_random_vlms(random_bundles, fixtures, arch):
    root, _ = fixtures
    b = random_bundles[arch]
    methods = "divprune(keep_ratio=0.5)+snapkv(budget=0.75, window=2, kernel=1)"
    df = bench.lmms_eval(b, ["fixture_pope", "fixture_mc"], methods, limit=2, include_path=str(root), max_new_tokens=2)
    assert set(df.task) == {"fixture_pope", "fixture_mc"} and (df.n > 0).all()
    assert (df.kv_bytes < df.kv_bytes_final + 1).all() and (df.visual_tokens > 0).all()


def _save(bundle, path: Path):
    bundle.model.save_pretrained(path)
    bundle.processor.save_pretrained(path)
    return str(path)


# one chat template for both models: lmms-eval's llava_hf sends "<image>\n" + text as a string,
# mmlab's adapter an image item and a text item; both render "USER: <image>\n{text} ASSISTANT:"
BOTH = ("{% for m in messages %}USER: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{% endfor %} ASSISTANT:")


def test_ground_truth_against_lmms_eval_llava_hf(tmp_path, fixtures):
    """On a tiny random LLaVA saved to disk, mmlab with no method and each method at keep-everything
    gives the same generations as lmms-eval's own transformers LLaVA model on the same task."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from lmms_eval.tasks import TaskManager

    from mmlab.testing import random_bundle

    root, _ = fixtures
    path = _save(random_bundle("llava", seed=3), tmp_path / "llava")
    manager = TaskManager("ERROR", include_path=[str(root)])
    ref_lm = LlavaHf(pretrained=path, device="cpu", device_map="cpu", dtype="float32", chat_template=BOTH)

    def answers(lm):
        out = simple_evaluate(model=lm, tasks=["fixture_gqa", "fixture_pope"], limit=4, task_manager=manager,
                              log_samples=True, verbosity="ERROR", gen_kwargs="max_new_tokens=6")
        return {t: [s["resps"][0][0].strip() for s in out["samples"][t]] for t in out["samples"]}

    ref = answers(ref_lm)
    assert sum(len(a.split()) for v in ref.values() for a in v) >= 8  # the random model says something
    for methods in ("", "divprune(keep_ratio=1.0)+snapkv(budget=1.0)", "fastv(keep_ratio=1.0)"):
        from mmlab.bench.lmms_model import MMLab

        costs = str(tmp_path / "costs.json")  # the sidecar goes to the test folder, not the working directory
        assert answers(MMLab(pretrained=path, methods=methods, chat_template=BOTH, costs=costs)) == ref, methods


def test_cli_run_writes_results_and_costs_sidecar(tmp_path):
    out = tmp_path / "out"
    cmd = [VENV_BIN / "lmms-eval", "--model", "mmlab", "--model_args",
           'pretrained=tiny-llava,methods="divprune(keep_ratio=0.25)+snapkv(budget=0.5, window=8)"',
           "--include_path", str(bench.tasks_dir()), "--tasks", "mmlab_shapes", "--limit", "6",
           "--output_path", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    costs = json.loads(next(out.glob("mmlab_costs_*.json")).read_text())
    assert costs["methods"].startswith("divprune(keep_ratio=0.25)+snapkv(budget=0.5, window=8")
    task = costs["tasks"]["mmlab_shapes"]
    assert task["n"] == 6 and task["visual_tokens"] == 36 and task["kv_bytes"] > 0 and task["prefill_ms"] > 0
    assert len(costs["samples"]) == 6 and next(out.rglob("*_results.json"))


def test_bad_input_one_line_and_nothing_written(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown lmms-eval task"):
        bench.lmms_eval(tiny, ["no_such_task"])
    with pytest.raises(MethodError, match="not valid"):
        bench.lmms_eval("tiny-llava", ["mmlab_shapes"], "divprune(", limit=1)
    out = tmp_path / "out"
    r = subprocess.run([VENV_BIN / "lmms-eval", "--model", "mmlab", "--model_args", "pretrained=tiny-llava,foo=1",
                        "--include_path", str(bench.tasks_dir()), "--tasks", "mmlab_shapes", "--limit", "2",
                        "--output_path", str(out)], capture_output=True, text=True)
    assert "unknown foo; valid: pretrained" in r.stderr  # (lmms-eval 0.7.3 exits 0 after logging an error)
    assert not list(out.rglob("*.json")) if out.exists() else True


# --- lm-eval -------------------------------------------------------------------------------------
def test_lm_eval_ground_truth_and_quantized(tmp_path, smol):
    """lm-eval's PIQA over a local file on SmolLM2: mmlab's loglikelihoods equal lm-eval's own HF
    model's on the same requests; RTN-8 stays close, GPTQ-3 moves further."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mmlab.bench.lm_model import MMLabLM

    task = bench_fixtures.write_piqa(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))

    def lls(lm):
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True)
        return [r[0][0] for s in out["samples"][task] for r in s["resps"]], out["results"][task]["acc,none"]

    ref, ref_acc = lls(HFLM(pretrained=smol.model, tokenizer=smol.tokenizer, batch_size=1))
    costs = str(tmp_path / "costs.json")
    dense, acc = lls(MMLabLM(pretrained=smol, costs=costs))
    assert dense == pytest.approx(ref, abs=2e-3) and acc == ref_acc
    rtn, _ = lls(MMLabLM(pretrained=smol, methods="rtn(bits=8, group_size=None)", costs=costs))
    gptq, _ = lls(MMLabLM(pretrained=smol, methods="gptq(bits=3, group_size=None, calib_samples=4, calib_len=128)",
                             costs=costs))
    d_rtn = max(abs(a - b) for a, b in zip(rtn, dense))
    d_gptq = max(abs(a - b) for a, b in zip(gptq, dense))
    assert 0 < d_rtn < 0.5 < d_gptq


def test_lm_eval_refuses_image_methods_on_text(smol, tmp_path):
    task = bench_fixtures.write_piqa(tmp_path)
    with pytest.raises(MethodError, match="text-only samples but divprune prunes visual tokens"):
        bench.lm_eval(smol, [task], "divprune(keep_ratio=0.5)", include_path=str(tmp_path), limit=1)


# --- paper recipes -----------------------------------------------------------------------------
CARDS = ("fastv", "divprune", "aim", "lookm", "kvmerger", "p-mod", "gamma-mod", "llama3-lowbit", "bf16-or-death",
         "mixllm", "slim-llm", "spqr")
ROOT = Path(__file__).parents[1]


def test_every_card_has_a_recipe_that_loads():
    from mmlab.batch import load_sweep

    for card in CARDS:
        sweep = load_sweep(ROOT / "sweeps" / "paper" / f"{card}.yaml", root=ROOT)
        assert sweep.paper["rows"] and sweep.output == ROOT / "runs" / "paper" / card
        assert f"sweeps/paper/{card}.yaml" in (ROOT / "papers" / f"{card}.md").read_text(), card


def test_paper_table_puts_ours_beside_the_paper():
    import pandas as pd

    from mmlab.report import paper_table

    paper = {"source": "s", "rows": [{"tasks": ["a", "b"], "methods": "divprune(keep_ratio=0.5)", "metric": "main",
                                      "value": 98.0, "relative": True},
                                     {"tasks": "a", "methods": "none", "metric": "acc", "value": 0.6}]}
    rows = [("r0", "a", "none", "acc", 0.8), ("r0", "a", "none", "f1", 0.1), ("r0", "b", "none", "em", 0.5),
            ("r1", "a", "divprune(keep_ratio=0.5)", "acc", 0.6), ("r1", "b", "divprune(keep_ratio=0.5)", "em", 0.5)]
    df = pd.DataFrame(rows, columns=["run_id", "task", "methods", "metric", "value"]).assign(status="ok")
    t = paper_table(paper, df)
    assert t.ours.tolist() == pytest.approx([100 * (0.6 / 0.8 + 0.5 / 0.5) / 2, 0.8])
    assert t["tasks measured"].tolist() == ["2/2", "1/1"]
    assert paper_table(paper, None).ours.isna().all()


def test_every_method_runs_in_bfloat16_and_bytes_follow_the_dtype():
    """Nothing assumes float32: a bfloat16 LLaVA takes every method (scores are computed in float32
    inside them), and KV bytes are counted in the model's dtype."""
    import torch

    from mmlab.testing import random_bundle

    s = mmlab.data.shapes(1)[0]
    b32 = random_bundle("llava")
    dense32 = mmlab.run(b32, s, [], max_new_tokens=2)
    b16 = random_bundle("llava")
    b16.model.to(torch.bfloat16)
    dense16 = mmlab.run(b16, s, [], max_new_tokens=2)
    assert dense16.kv_bytes * 2 == dense32.kv_bytes and dense16.prefill_flops == dense32.prefill_flops
    fixed = {"snapkv": "snapkv(budget=0.5, window=4, kernel=1)",
             "dpn_experts": "dpn_experts(layers=(0.0, 0.34), kernels=((1, 2, 4), (1, 2)))"}  # 3 layers: 2 routers
    from mmlab.methods.kv_cache import TextPredictor
    from mmlab.methods.token_pruning import PoolingRouters, VisionPredictor

    b16.extras["dynamic_llava"] = VisionPredictor(b16.dims()["hidden"], d_model=32, ff=64).to(torch.bfloat16)
    b16.extras["dynamic_llava_text"] = TextPredictor(b16.dims()["hidden"], d_model=32).to(torch.bfloat16)
    b16.extras["dpn"] = PoolingRouters(b16.dims()["hidden"], (0.0, 0.34), ((1, 2, 4), (1, 2))).to(torch.bfloat16)
    mmlab.visual_heads(b16, [s])  # yopo's head ranking, measured on the bfloat16 model
    for name in mmlab.methods.available():
        if name == "mod_trained":  # needs trained routers (tiny-llava-pmod / -gmod)
            continue
        cls = mmlab.methods.method_class(name)
        text = fixed.get(name) or (f"{name}(group_size=32)" if "group_size" in cls.__dataclass_fields__
                                   and name not in ("kivi", "spqr", "act_quant") else name)
        tr = mmlab.run(b16, s, parse(text), max_new_tokens=2)
        assert tr.kv_bytes > 0 and tr.answer_ids, text
