import pytest

import mmlab
from mmlab.methods import get
from mmlab.methods.base import MethodError, parse


def test_registry():
    assert "random" in mmlab.methods.available()
    m = mmlab.methods.get("random", keep_ratio=0.5)
    assert m.keep_ratio == 0.5 and m.params() == {"keep_ratio": 0.5, "seed": 0}
    with pytest.raises(mmlab.MethodError, match="unknown method 'nope'; available: .*random"):
        mmlab.methods.get("nope")
    with pytest.raises(mmlab.MethodError, match="random has no parameter keep; valid: keep_ratio, seed"):
        mmlab.methods.get("random", keep=0.5)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "half"])
def test_bad_keep_ratio(bad, tiny, test_samples):
    with pytest.raises(mmlab.MethodError, match=r"keep_ratio must be in \(0, 1\]"):
        mmlab.run(tiny, test_samples[0], [mmlab.methods.get("random", keep_ratio=bad)])


def test_image_method_on_text_model(smol):
    with pytest.raises(mmlab.MethodError, match="no image"):
        mmlab.run(smol, "hello", [mmlab.methods.get("random")])


def test_random_is_seeded(tiny, test_samples):
    a = mmlab.run(tiny, test_samples[0], [mmlab.methods.get("random", keep_ratio=0.2, seed=1)])
    b = mmlab.run(tiny, test_samples[0], [mmlab.methods.get("random", keep_ratio=0.2, seed=1)])
    c = mmlab.run(tiny, test_samples[0], [mmlab.methods.get("random", keep_ratio=0.2, seed=2)])
    assert a.image_kept[0].tolist() == b.image_kept[0].tolist() != c.image_kept[0].tolist()


@pytest.mark.parametrize("name, params, match", [
    ("random", {"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"), ("h2o", {"budget": -1}, "budget must be"),
    ("fastv", {"layer": 0}, "layer must be an integer >= 1"), ("rtn", {"bits": 0}, "bits must be"),
    ("kivi", {"residual": -1}, "residual"), ("mod", {"schedule": "cosine"}, "schedule must be one of"),
])
def test_parameter_ranges_fail_at_construction(name, params, match):
    """What can be checked without a model is checked where the method is written (``Method.check``)."""
    with pytest.raises(MethodError, match=match):
        get(name, **params)
    with pytest.raises(MethodError, match=match):
        parse(f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})")
