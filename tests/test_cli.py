import subprocess
import sys

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
