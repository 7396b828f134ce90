"""tiny-llava-deep, the realistic sandbox VLM (the issue's from-scratch route): 12 LLM layers, a 24-word
system turn before the image, 144 visual tokens. It loads, meets the accuracy bars, and its recipe runs
(its ground truth against stock transformers: tests/test_ground_truth.py)."""

import pytest
import torch

import mmlab
from mmlab.tiny.model import SYSTEM


@pytest.fixture(scope="module")
def deep():
    return mmlab.load("tiny-llava-deep")


def test_shape_of_the_model_and_its_prompt(deep):
    assert deep.n_layers == 12 and deep.model.config.image_seq_length == 144
    ids = deep.encode(mmlab.data.shapes(n=1)[0]).input_ids[0]
    first_image = (ids == deep.image_token_id).nonzero()[0].item()
    assert first_image >= 20 + 3  # <s> system : + the system turn's words, before the image
    assert deep.tokenizer.decode(ids[: first_image]).startswith(f"<s> system : {SYSTEM} user :")


@pytest.mark.slow
def test_the_shipped_checkpoint_meets_the_bars(deep):
    """The issue's bars on 100 test samples: >= 85% correct, and random pruning to 10% of the visual
    tokens costs >= 15 points (measured: 86 and 71 of 100; on 400 samples 86.5% and 71.0%). Counted in
    answers, not float differences."""
    samples = mmlab.data.shapes(n=100, seed=0, split="test")
    dense = round(100 * mmlab.evaluate(deep, samples, progress=False).accuracy)
    pruned = round(100 * mmlab.evaluate(deep, samples, "random(keep_ratio=0.1)", progress=False).accuracy)
    assert dense >= 85 and dense - pruned >= 15, (dense, pruned)


def test_a_checkpoint_state_has_the_model_names(tiny):
    """Saved checkpoints use the legacy names (``vision_tower.``): the state the trainers start from is
    mapped to the model's names and equals what ``from_pretrained`` loads (a raw load silently missed it)."""
    from mmlab.arch.tiny_llava import CHECKPOINT_DIR, checkpoint_state

    state = checkpoint_state(CHECKPOINT_DIR / "tiny-llava", ("model.vision_tower.", "model.multi_modal_projector."))
    mine = tiny.model.state_dict()
    assert len(state) == sum(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in mine)
    assert all(torch.equal(v, mine[k]) for k, v in state.items())
    full = checkpoint_state(CHECKPOINT_DIR / "tiny-llava")  # every weight (``weights_from``): the model's names
    assert full.keys() == mine.keys() and all(torch.equal(v, mine[k]) for k, v in full.items())


def test_training_recipe_runs_and_writes_a_loadable_checkpoint(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from mmlab.arch.tiny_llava import CHECKPOINT_DIR
    from mmlab.tiny.train import train

    out = train(steps=3, batch_size=8, text_layers=12, system=SYSTEM, vision_from=CHECKPOINT_DIR / "tiny-llava",
                out=tmp_path / "deep", eval_every=0)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.num_hidden_layers == 12 and model.config.mmlab_system_prompt == SYSTEM
    shipped = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR / "tiny-llava")
    assert not torch.equal(model.model.vision_tower.encoder.layers[0].mlp.fc1.weight,  # trained from tiny-llava's
                           shipped.model.vision_tower.encoder.layers[0].mlp.fc1.weight)
