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
