import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    import mmlab

    return mmlab.load("tiny-llava")


@pytest.fixture(scope="session")
def smol():
    import mmlab

    return mmlab.load("smollm2-135m")


@pytest.fixture(scope="session")
def test_samples():
    import mmlab

    return mmlab.data.shapes(n=16, seed=0, split="test")


@pytest.fixture(scope="session")
def random_bundles():
    from mmlab.testing import ARCHITECTURES, random_bundle

    return {a: random_bundle(a) for a in ARCHITECTURES}


@pytest.fixture(scope="session")
def eager_tiny():
    """tiny-llava loaded with eager attention: the stock model's own attention weights, the
    independent reference for every score the engine recomputes beside SDPA."""
    from transformers import LlavaForConditionalGeneration

    from mmlab.arch.tiny_llava import CHECKPOINT_DIR

    path = CHECKPOINT_DIR / "tiny-llava"
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
