"""The base model's attribute answers that text-only training learns from."""

from dataclasses import replace

import pytest
from PIL import Image

from yollava import templates
from yollava.generate import GenerationResult
from yollava.pipeline import ask_attributes
from yollava.recipe import RecipeConfig


class ScriptedGenerator:
    """Answers each request from the photo it shows (by the photo's width), and records what was asked."""

    def __init__(self, answers: dict[int, str]):
        self.answers, self.asked = answers, []

    def generate(self, reqs):
        out = []
        for r in reqs:
            (photo,) = r.images
            self.asked.append((r.messages[0].text, photo.width))
            out.append(GenerationResult(self.answers[photo.width], [], "stop", 0))
        return out


def _photos(n):
    return [Image.new("RGB", (10 + i, 8)) for i in range(n)]  # photo i is 10 + i wide


def test_one_vote_is_the_paper_one_look_at_photo_i():
    cfg = RecipeConfig(attribute_questions=3, attribute_votes=1)
    gen = ScriptedGenerator({10: "it is red.", 11: "it is blue.", 12: "it is green."})
    got = ask_attributes(gen, _photos(3), cfg)
    assert [q for q, _ in got] == [b for _, b in templates.ATTRIBUTE_QUESTIONS[:3]]
    assert [a for _, a in got] == ["it is red.", "it is blue.", "it is green."]
    assert [w for _, w in gen.asked] == [10, 11, 12]


def test_votes_keep_the_most_common_answer_across_photos():
    # the subject is red in every photo; photos 0 and 3 answer about another object
    gen = ScriptedGenerator({10: "it is blue.", 11: "it is red.", 12: "it is red.", 13: "it is green."})
    got = ask_attributes(gen, _photos(4), RecipeConfig(attribute_questions=2, attribute_votes=4))
    assert [a for _, a in got] == ["it is red.", "it is red."]
    # each question asked about every photo once, starting at its own photo
    assert [w for q, w in gen.asked if q == templates.ATTRIBUTE_QUESTIONS[1][0]] == [11, 12, 13, 10]


def test_votes_tie_to_the_first_photo_asked_and_cap_at_the_photos():
    gen = ScriptedGenerator({10: "it is blue.", 11: "it is red."})
    cfg = RecipeConfig(attribute_questions=2, attribute_votes=8)
    assert [a for _, a in ask_attributes(gen, _photos(2), cfg)] == ["it is blue.", "it is red."]
    assert len(gen.asked) == 2 * 2


def test_empty_answers_do_not_vote():
    gen = ScriptedGenerator({10: "", 11: "", 12: "it is red."})
    got = ask_attributes(gen, _photos(3), RecipeConfig(attribute_questions=1, attribute_votes=3))
    assert got == [(templates.ATTRIBUTE_QUESTIONS[0][1], "it is red.")]
    gen = ScriptedGenerator({10: ""})
    assert ask_attributes(gen, _photos(1), RecipeConfig(attribute_questions=1, attribute_votes=3)) == []


@pytest.mark.parametrize("votes", [0, -1])
def test_votes_below_one_are_refused(votes):
    with pytest.raises(ValueError, match=f"attribute_votes={votes}"):
        replace(RecipeConfig(), attribute_votes=votes)


# ---------------------------------------------------------------- negatives


def _pool_on_a_line():
    """Pool images at cosines 0.9, 0.8, ..., 0.1 to the one positive (ids p9 .. p1), and its index."""
    import numpy as np

    from yollava.mining import PoolIndex
    from yollava.pool import NegativePool

    cos = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    ids = [f"p{round(c * 10)}" for c in cos]
    emb = np.array([[c, (1 - c * c) ** 0.5] for c in cos], dtype=np.float32)
    return NegativePool(ids, PoolIndex.build(emb, ids)), np.array([[1.0, 0.0]], dtype=np.float32)


def test_known_lookalikes_come_first_and_mining_tops_up():
    from yollava.pipeline import SubjectSpec, choose_negatives

    pool, own = _pool_on_a_line()
    cfg = RecipeConfig(hard_negatives=4, easy_negatives=3)
    spec = SubjectSpec("bo", ["me.png"], hard_negatives=("p2", "p1", "p2"))
    hard, easy = choose_negatives(spec, pool, own, cfg)
    assert hard == ["p2", "p1", "p9", "p8"]  # given (deduplicated, in order), then the nearest others
    assert len(easy) == 3 and not set(easy) & set(hard)
    # no known look-alikes: mining alone, as before
    assert choose_negatives(SubjectSpec("bo", ["me.png"]), pool, own, cfg)[0] == ["p9", "p8", "p7", "p6"]
    # more look-alikes than asked: the first ones, no mining
    many = SubjectSpec("bo", ["me.png"], hard_negatives=("p1", "p2", "p3", "p4", "p5"))
    assert choose_negatives(many, pool, own, cfg)[0] == ["p1", "p2", "p3", "p4"]
    # no hard negatives asked (the ablation): none; a look-alike may be drawn as easy like any pool image
    none, easy0 = choose_negatives(spec, pool, own, replace(cfg, hard_negatives=0, easy_negatives=9))
    assert none == [] and sorted(easy0) == sorted(pool.ids)


def test_a_subject_cannot_name_its_own_photo_a_hard_negative():
    from yollava.pipeline import SubjectSpec

    with pytest.raises(ValueError, match=r"bo.*hard_negatives.*'me.png'"):
        SubjectSpec("bo", ["me.png", "me2.png"], hard_negatives=["p1", "me.png"])
    assert SubjectSpec("bo", ["me.png"], hard_negatives=["p1"]).hard_negatives == ("p1",)
