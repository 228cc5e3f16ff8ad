"""Evaluation metrics: answer parsing, recognition and QA accuracy, markdown tables."""

import math

import pytest

from yollava.metrics import (
    QAResult,
    RecognitionResult,
    markdown_table,
    parse_yes_no,
    yes_no_from_logprobs,
)


@pytest.mark.parametrize("text, expected", [
    ("Yes, <bo> is in this photo.", True),
    ("No, <bo> is not in this photo.", False),
    ("No.", False),
    ("yes", True),
    ("YES!", True),
    ("  **Yes**", True),
    ("Yeah, that's him.", True),
    ("Nope", False),
    ("No, but wait... yes", False),          # first decisive word wins
    ("Yes and no", True),
    ("I think yes.", True),
    ("I don't know", None),
    ("I'm not sure.", None),
    ("<bo> is not in this photo.", None),    # "not" alone is not decisive
    ("Nobody knows; yesterday was sunny", None),  # whole words only
    ("Yes, <no> is here.", True),            # a concept named <no> is not an answer
    ("<no> <yes>", None),
    ("", None),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_parse_yes_no_rejects_non_strings():
    with pytest.raises(TypeError, match="None"):
        parse_yes_no(None)


def test_yes_no_from_logprobs():
    assert yes_no_from_logprobs(-0.1, -2.0) is True
    assert yes_no_from_logprobs(-2.0, -0.1) is False
    assert yes_no_from_logprobs(-1.0, -1.0) is False  # a tie answers no
    with pytest.raises(ValueError, match="NaN"):
        yes_no_from_logprobs(math.nan, -1.0)


def test_recognition_accuracies():
    pairs = [(True, True), (True, True), (True, False),            # 2/3 positives
             (False, False), (False, True), (False, None), (False, False)]  # 2/4 negatives
    r = RecognitionResult.from_predictions(pairs)
    assert r.positive_accuracy == pytest.approx(2 / 3)
    assert round(r.positive_accuracy, 3) == 0.667
    assert r.negative_accuracy == pytest.approx(0.5)
    assert r.weighted_accuracy == pytest.approx((2 / 3 + 0.5) / 2)
    assert r.to_dict() == {
        "positive_accuracy": pytest.approx(2 / 3), "negative_accuracy": 0.5,
        "weighted_accuracy": pytest.approx(7 / 12), "num_positive": 3, "num_negative": 4,
        "positive_correct": 2, "negative_correct": 2, "unparsed": 1,
    }


def test_recognition_unparsed_counts_wrong_on_both_sides():
    r = RecognitionResult.from_predictions([(True, None), (False, None)])
    assert r.positive_accuracy == 0.0 and r.negative_accuracy == 0.0 and r.unparsed == 2


def test_recognition_empty_class_reports_none():
    r = RecognitionResult.from_predictions([(True, True)])
    assert r.positive_accuracy == 1.0
    assert r.negative_accuracy is None and r.weighted_accuracy is None
    empty = RecognitionResult.from_predictions([])
    assert empty.to_dict()["positive_accuracy"] is None


def test_recognition_rejects_non_bool_pairs():
    with pytest.raises(TypeError, match="pair 1"):
        RecognitionResult.from_predictions([(True, True), (True, "yes")])
    with pytest.raises(TypeError, match="pair 0"):
        RecognitionResult.from_predictions([(1, True)])


def test_qa_result():
    r = QAResult.from_predictions([("A", "A"), ("B", "A"), (None, "B"), ("B", "B")])
    assert r.accuracy == 0.5
    assert r.to_dict() == {"accuracy": 0.5, "total": 4, "correct": 2, "unparsed": 1}
    assert QAResult.from_predictions([]).accuracy is None
    with pytest.raises(TypeError, match="pair 0"):
        QAResult.from_predictions([("A", None)])


def test_markdown_table():
    rows = [{"subject": "bo", "weighted": 2 / 3, "n": 3, "note": None},
            {"subject": "a|b", "weighted": 1.0, "n": 0, "note": "two\nlines", "extra": 1}]
    assert markdown_table(rows, ["subject", "weighted", "n", "note"]) == (
        "| subject | weighted | n | note |\n"
        "|---|---|---|---|\n"
        "| bo | 0.667 | 3 | - |\n"
        "| a\\|b | 1.000 | 0 | two lines |\n"
    )
    assert markdown_table([], ["x"]) == "| x |\n|---|\n"


def test_markdown_table_errors():
    with pytest.raises(KeyError, match=r"row 0 .*'weighted'"):
        markdown_table([{"subject": "bo"}], ["subject", "weighted"])
    with pytest.raises(ValueError, match="columns"):
        markdown_table([], [])
