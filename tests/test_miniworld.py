"""The miniature world's groundwork: deterministic scenes, the unnamed detail in the pixels, tasks that
answer truthfully, a word-level tokenizer, and the pretraining losses on a real step."""

import random

import numpy as np
import pytest

from yollava.backbone import BackboneError, load_backbone
from yollava.miniworld import tasks, world
from yollava.miniworld.model import build_mini_tokenizer


def test_scenes_deterministic_in_seed():
    a = world.random_scene(random.Random(3))
    b = world.random_scene(random.Random(3))
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))


def test_every_attribute_changes_the_pixels_and_notch_has_no_word():
    o = world.ALL_OBJECTS[17]
    for kind, others in o.variants().items():
        for other in others:
            assert not np.array_equal(world.draw(o), world.draw(other)), (kind, other)
    notch_twin = o.variants()["notch"][0]
    assert notch_twin.words() == o.words()  # words cannot tell them apart


def test_tasks_answer_truthfully():
    rng = random.Random(0)
    for _ in range(200):
        t = tasks.existence(rng)
        q = t.messages[0].text
        assert t.messages[1].text == ("yes." if t.correct == 0 else "no.")
        desc = q[len("is there "):-len(" in this photo?")]
        present = any(tasks.describe(o, attrs) == desc for o in t.scene.objects()
                      for attrs in [("shape",), ("colour",), ("colour", "shape"), ("colour", "pattern", "shape"),
                                    ("pattern", "shape")])
        assert present == (t.correct == 0)
    for _ in range(200):
        t = tasks.naming(rng, by_example=True)
        target = t.definition.examples[0][0].cells[t.definition.examples[0][1]]
        assert (target in t.scene.objects()) == (t.correct == 0)


def test_word_tokenizer_round_trip():
    tok = build_mini_tokenizer()
    text = "is there a red striped circle in this photo?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id


def test_mini_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    from yollava.miniworld import model

    monkeypatch.setattr(model, "WEIGHTS", tmp_path)
    with pytest.raises(BackboneError, match="pretrain"):
        load_backbone("mini")


def test_pretraining_step_lowers_every_loss():
    import torch

    from yollava.miniworld.pretrain import MiniPretrainer

    torch.manual_seed(0)
    pt = MiniPretrainer(seed=0)
    rng = random.Random(0)
    batch = [tasks.sample_task(rng) for _ in range(8)]
    opt = torch.optim.AdamW(pt.parameters(), lr=2e-3)
    first = {k: float(v) for k, v in pt.loss(batch).items()}
    for _ in range(15):
        losses = pt.loss(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    last = {k: float(v) for k, v in pt.loss(batch).items()}
    assert all(last[k] < first[k] for k in first), (first, last)


def test_every_task_kind_terminates_on_crowded_scenes():
    """A scene holding all four shapes has no absent shape: existence must still answer."""
    rng = random.Random(7)
    for _ in range(3000):
        tasks.existence(rng)
    for kind, make in tasks.MAKERS.items():
        for _ in range(200):
            make(rng)
