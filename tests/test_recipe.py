import pytest

from yollava import templates
from yollava.recipe import RecipeConfig, build_training_set


def test_counts_as_configured():
    cfg = RecipeConfig(hard_negatives=7, easy_negatives=5, positive_questions=2, holdout=0.0)
    photos = [f"own{i}" for i in range(4)]
    ts = build_training_set("bo", photos, [f"h{i}" for i in range(7)], [f"e{i}" for i in range(5)],
                            [("What colour is {c}?", "Brown.")] * 3, cfg)
    assert ts.counts() == {"positive": 4 * 2 * 2, "negative": 12, "text": 3}
    flips = {s.photo.flip for s in ts.train if s.kind == "positive"}
    assert flips == {False, True}
    for s in ts.train:
        if s.kind == "text":
            assert s.photo is None and s.messages[0].images == 0 and "<bo>" in s.messages[0].text
        else:
            assert s.messages[0].images == 1
        if s.kind == "negative":
            assert s.photo.key not in photos and s.messages[1].text.startswith("No")
        if s.kind == "positive":
            assert s.messages[1].text.startswith("Yes")


def test_own_photo_among_negatives_refused():
    with pytest.raises(ValueError, match="own photos"):
        build_training_set("bo", ["a", "b"], ["a"], [], [], RecipeConfig())


def test_holdout_keeps_whole_photos_out():
    cfg = RecipeConfig(holdout=0.25)
    photos = [f"own{i}" for i in range(8)]
    ts = build_training_set("bo", photos, [f"h{i}" for i in range(8)], [], [], cfg)
    held = {s.photo.key for s in ts.holdout if s.kind == "positive"}
    trained = {s.photo.key for s in ts.train if s.kind == "positive"}
    assert len(held) == 2 and not held & trained
    assert any(s.kind == "negative" for s in ts.holdout)


def test_phrasings_are_many_and_distinct():
    assert len(set(templates.RECOGNITION_QUESTIONS)) >= 30
    assert all("{c}" in q for q in templates.RECOGNITION_QUESTIONS)


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(hard_negatives=-1), dict(holdout=1.0), dict(lr=0),
                                 dict(attribute_questions=99)])
def test_bad_config_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RecipeConfig(**bad)


def test_unknown_field_named():
    with pytest.raises(ValueError, match="epochz"):
        RecipeConfig.from_dict({"epochz": 3})
