import subprocess
import sys

import pytest

from mmlab.cli import main


def test_help():
    out = subprocess.run([sys.executable, "-m", "mmlab.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("info", "train-tiny", "eval", "reproduce"):
        assert cmd in out.stdout


def test_info(capsys):
    assert main(["info"]) == 0
    assert "random" in capsys.readouterr().out


def test_eval_bad_method_is_one_line(capsys):
    assert main(["eval", "--method", "nosuch", "--n-samples", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown method 'nosuch'") and "\n" not in err


def test_eval_runs(capsys):
    assert main(["eval", "--method", "random", "--param", "keep_ratio=0.5", "--n-samples", "4"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_import_and_help_do_not_load_torch():
    """``import mmlab`` and the command line's parser stay light (the public names load on first use)."""
    code = "import sys, mmlab, mmlab.cli; mmlab.cli.parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_info_lists_the_trained_mod_variants(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llava-pmod" in out and "tiny-llava-gmod" in out
    assert "tiny-llava-dpn (trained)" in out  # DPN's pooling routers ship


def test_eval_composes_repeated_methods(capsys):
    import json

    assert main(["eval", "--method", "random", "--param", "keep_ratio=0.5", "--method", "h2o(budget=0.5)",
                 "--n-samples", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m.split("(")[0] for m in out["methods"]] == ["random", "h2o"] and "keep_ratio=0.5" in out["methods"][0]


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "tiny-lava"], "unknown model 'tiny-lava' (did you mean 'tiny-llava'?)"),
    (["eval", "--method", "random", "--param", "keep_ratio"], "must look like name=value"),
    (["eval", "--method", "random", "--method", "h2o", "--param", "budget=0.5"],
     "--param sets the parameters of the one"),
    (["eval", "--method", "random(keep_ratio=1.5)"], "keep_ratio must be in (0, 1]"),
    (["train-tiny", "--dpn", "--model", "smol-llava"], "--dpn fine-tunes tiny-llava-deep into tiny-llava-dpn"),
    (["eval", "--model", "tiny-llava-deep", "--method", "dpn_experts"], "dpn_experts needs trained pooling routers"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_bundle_repr_is_one_line_and_run_accepts_names():
    import mmlab

    b = mmlab.load("tiny-llava")
    assert repr(b).startswith("Bundle('tiny-llava', adapter=tiny-llava, layers=4") and "\n" not in repr(b)
    s = mmlab.data.shapes(n=1, seed=0, split="test")[0]
    by_name = mmlab.run(b, s, "random(keep_ratio=0.25)")
    by_object = mmlab.run(b, s, [mmlab.methods.get("random", keep_ratio=0.25)])
    assert by_name.image_tokens_per_layer() == by_object.image_tokens_per_layer()
    with pytest.raises(mmlab.MethodError, match="methods must be"):
        mmlab.run(b, s, 3)


def test_eval_decodes_the_continuation_for_a_decode_method(capsys):
    spec = "dynamic_llava_decode(random_keep=0.5)"
    assert main(["eval", "--model", "smollm2-135m", "--method", spec, "--n-samples", "1", "--window", "96"]) == 2
    err = capsys.readouterr().err.strip()
    assert "acts while decoding" in err and "\n" not in err  # no --context: nothing would be decoded
    assert main(["eval", "--model", "smollm2-135m", "--method", spec, "--n-samples", "1", "--window", "96",
                 "--context", "64"]) == 0
    assert '"generated_kept"' in capsys.readouterr().out
