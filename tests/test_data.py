import numpy as np
import pytest

import mmlab
from mmlab.data.shapes import QUESTION_TYPES, make_sample, patch_labels
from mmlab.data.text import offline_corpus


def test_shapes_deterministic_and_split_dependent():
    a = mmlab.data.shapes(8, seed=3, split="test")
    b = mmlab.data.shapes(8, seed=3, split="test")
    c = mmlab.data.shapes(8, seed=3, split="train")
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c))


def test_question_types_balanced_and_answers_single_words():
    s = mmlab.data.shapes(200, seed=0, split="test")
    counts = {t: sum(x.qtype == t for x in s) for t in QUESTION_TYPES}
    assert set(counts.values()) == {50}
    assert all(len(x.answer.split()) == 1 for x in s)
    yes = sum(x.answer == "yes" for x in s if x.qtype == "small")
    assert 15 <= yes <= 35  # balanced yes / no
    side = [x.answer for x in s if x.qtype == "position"]
    assert 15 <= side.count("left") <= 35


def test_answers_agree_with_scene():
    for i in range(40):
        s = make_sample(i, seed=1, split="val")
        if s.qtype == "count":
            assert s.answer == ["zero", "one", "two", "three", "four"][len(s.objects)]
        if s.qtype == "color":
            shape = s.question.split()[-2]
            assert s.answer == next(o.color for o in s.objects if o.shape == shape)
        if s.qtype == "position":
            obj = next(o for o in s.objects if o.color == s.question.split()[2])
            assert s.answer == ("left" if obj.x < 48 else "right")


def test_training_conversations_ask_what_each_scene_shows():
    """smol-llava's training turns: every answer agrees with the scene, the question templates are the
    test split's own, and a scene is deterministic from (split, seed, index)."""
    from mmlab.data.shapes import scene_with_all_questions

    templates = {make_sample(i, 0, "test").question.split()[0] for i in range(8)}
    for i in range(30):
        image, objs, qas = scene_with_all_questions(i, seed=0, split="train")
        assert 2 <= len(qas) <= 8 and {q.split()[0] for q, _, _ in qas} <= templates
        for q, a, t in qas:
            words = q.split()
            if t == "count":
                assert a == ["zero", "one", "two", "three", "four"][len(objs)]
            elif t == "color":
                assert a == next(o.color for o in objs if o.shape == words[-2])
            elif t == "position":
                assert a == ("left" if next(o for o in objs if o.color == words[2]).x < 48 else "right")
            else:
                assert a == ("yes" if any(o.small and o.color == words[4] for o in objs) else "no")
    again = scene_with_all_questions(3, seed=0, split="train")
    assert again[2] == scene_with_all_questions(3, seed=0, split="train")[2]


def test_patch_labels_cover_objects():
    s = make_sample(1, seed=0, split="train")
    lab = patch_labels(s.objects)
    assert lab["color"].shape == (144,)
    assert lab["centre"].sum() == len(s.objects)
    assert (lab["color"] > 0).sum() >= len(s.objects)


def test_bad_split_and_n():
    with pytest.raises(ValueError, match="unknown split"):
        mmlab.data.shapes(4, split="dev")
    with pytest.raises(ValueError, match="n must be"):
        mmlab.data.shapes(0)


def test_offline_corpus_is_real_text():
    t = offline_corpus()
    assert len(t) > 100_000
    assert t == offline_corpus()
    assert t.count(" the ") > 1000
