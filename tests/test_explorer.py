"""The explorer's views, one per family, read from the Traces (the browser test drives the widget)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mmlab  # noqa: E402
from mmlab import figures, viz  # noqa: E402
from mmlab.explorer import Explorer, family  # noqa: E402
from mmlab.methods import MethodError, as_methods, get  # noqa: E402


@pytest.fixture(scope="module")
def tiny_explorer(tiny, test_samples):
    return Explorer(tiny, test_samples[:2], repeats=1)


def test_only_runnable_methods_are_offered(tiny, smol):
    on_tiny, on_smol = Explorer(tiny, []).method_names, Explorer(smol, []).method_names
    assert "mod_trained" not in on_tiny and {"random", "h2o", "rtn", "mod"} <= set(on_tiny)  # no routers here
    assert "mod_trained" in Explorer(mmlab.load("tiny-llava-pmod"), []).method_names
    assert not {"random", "divprune", "fastv", "mod"} & set(on_smol) and {"h2o", "kivi", "gptq"} <= set(on_smol)


def test_controls_are_the_methods_own():
    assert Explorer.controls("h2o") == ("budget", {"recent_ratio": 0.5})
    assert Explorer.controls("random")[0] == "keep_ratio" and Explorer.spec("rtn", 3, "group_size=32") == \
        "rtn(bits=3, group_size=32, sym=False, targets='llm')"
    with pytest.raises(MethodError, match=r"keep_ratio must be in \(0, 1\]"):
        Explorer.spec("random", 1.5)


@pytest.mark.parametrize("spec_a, spec_b, view", [
    ("random(keep_ratio=0.25)", "divprune(keep_ratio=0.25)", "token_pruning"),
    ("mod(ratio=0.5)", "none", "mod"),
    ("h2o(budget=0.5)+kivi(bits=2, residual=16)", "snapkv(budget=0.5, window=8)", "kv_cache"),
    ("rtn(bits=3, group_size=32)", "rtn(bits=4, group_size=32)", "quantization"),
])
def test_each_family_has_its_view(tiny_explorer, spec_a, spec_b, view):
    assert family(as_methods(spec_a)) == view
    fig, html = tiny_explorer.view(0, spec_a, spec_b, layer=2, head=0)
    assert len(fig.axes) >= 2 and "<table>" in html
    plt.close(fig)
    assert tiny_explorer.last[1]["view"] == view


def test_views_reuse_runs(tiny_explorer):
    fig, _ = tiny_explorer.view(1, "random(keep_ratio=0.25)", "none", layer=1, head=None)
    plt.close(fig)
    runs = tiny_explorer.runs
    for head in (None, 0, 1):  # the head only redraws
        fig, _ = tiny_explorer.view(1, "random(keep_ratio=0.25)", "none", layer=1, head=head)
        plt.close(fig)
    assert tiny_explorer.runs == runs


def test_kv_status_marks_kept_evicted_merged_and_quantized(smol):
    sample = mmlab.data.needle(smol.tokenizer, [512], [0.5], 1, seed=0)[0]
    tr = mmlab.run(smol, sample, [get("kvmerger", budget=0.3), get("kivi", bits=4, residual=32)], max_new_tokens=1)
    status, into = viz.kv_status(tr, 5, 1)
    held = int(((status == 0) | (status == 3)).sum())
    assert held == tr.kv_lengths_final[5]  # what the cache holds after the methods
    assert (status == 3).sum() == tr.extra["kv_quantized"][5][0] and (status == 1).any()
    merged = np.nonzero(status == 2)[0]
    assert len(merged) and all(status[into[m]] in (0, 3) for m in merged)  # merged into a held token
    html = viz.kv_html([f"t{i}" for i in range(len(status))], tr.modality.numpy(), status, into)
    assert html.count("line-through") == (status == 1).sum() and "merged into #" in html


def test_export_writes_the_view_with_provenance(tiny_explorer, tmp_path):
    fig, _ = tiny_explorer.view(0, "fastv(keep_ratio=0.5)", "none", layer=3, head=1)
    png, _ = tiny_explorer.export("view", directory=tmp_path)
    meta = figures.provenance(png)["params"]
    assert meta["A"].startswith("fastv(") and meta["layer"] == 3 and meta["head"] == 1 and meta["model"] == "tiny-llava"
    plt.close(fig)


def test_kv_view_shows_the_generated_tokens_a_decode_method_kept(smol):
    ex = Explorer(smol, ["Write one sentence about the sea."], repeats=1)
    assert "dynamic_llava_decode" in ex.method_names  # smollm2 ships the output-text predictor
    spec = "dynamic_llava_decode(random_keep=0.5)"
    fig, html = ex.view(0, spec, "none", layer=5, head=0)
    plt.close(fig)
    tr = ex.trace(0, spec, 5)
    status = viz.generated_kv_status(tr, 5)
    assert len(status) == len(tr.extra["decode_kept"]) and (status == 1).any() and (status == 0).any()
    assert "mmlab-kv-generated" in html and html.count("line-through") >= int((status == 1).sum())
    assert (viz.generated_kv_status(tr, 0) == 0).all()  # before the sparse layer every generated token stays
