"""Evaluation metrics for Yo'LLaVA: answer parsing, recognition and QA accuracy, tables.

Pure Python, no model. Conventions:

- An answer that cannot be parsed (`None`) always counts as wrong.
- An accuracy over an empty set is `None`, never NaN; the weighted
  recognition accuracy is `None` unless both classes are non-empty.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_YES_WORDS = frozenset({"yes", "yeah", "yep", "yup"})
_NO_WORDS = frozenset({"no", "nope"})
# Concept tokens such as `<bo>` or `<no>` are names, never answers.
_TOKEN_RE = re.compile(r"<[^<>\s]*>")
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def parse_yes_no(text: str) -> bool | None:
    """Parse a generated yes/no answer: True, False, or None when undecided.

    The first decisive word wins: "No, ... yes" is False, "Yes and no" is
    True. Decisive words are yes/yeah/yep/yup and no/nope, matched as whole
    words, case-insensitively, after removing `<...>` concept tokens. "not"
    is not decisive ("I'm not sure" is None), nor is anything else.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a string, got {type(text).__name__}: {text!r}")
    for word in _WORD_RE.findall(_TOKEN_RE.sub(" ", text).lower()):
        if word in _YES_WORDS:
            return True
        if word in _NO_WORDS:
            return False
    return None


def yes_no_from_logprobs(logp_yes: float, logp_no: float) -> bool:
    """True when "Yes" is strictly more likely than "No"; a tie answers no."""
    logp_yes, logp_no = float(logp_yes), float(logp_no)
    if math.isnan(logp_yes) or math.isnan(logp_no):
        raise ValueError(f"log-probabilities must not be NaN: yes={logp_yes}, no={logp_no}")
    return logp_yes > logp_no


def margin_auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a positive's margin > a negative's margin), ties counting half; None unless both exist."""
    if not positive or not negative:
        return None
    if any(math.isnan(x) for x in [*positive, *negative]):
        raise ValueError("margins must not be NaN")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class RecognitionResult:
    """Recognition accuracy on positives (subject present) and negatives (absent)."""

    num_positive: int
    num_negative: int
    positive_correct: int
    negative_correct: int
    unparsed: int

    @classmethod
    def from_predictions(cls, pairs: Iterable[tuple[bool, bool | None]]) -> RecognitionResult:
        """Count (is_positive, predicted_yes) pairs; predicted None is wrong."""
        counts = {"num_positive": 0, "num_negative": 0, "positive_correct": 0,
                  "negative_correct": 0, "unparsed": 0}
        for i, (is_positive, predicted) in enumerate(pairs):
            if not isinstance(is_positive, bool) or not isinstance(predicted, (bool, type(None))):
                raise TypeError(f"pair {i} must be (bool, bool | None), "
                                f"got {(is_positive, predicted)!r}")
            counts["unparsed"] += predicted is None
            if is_positive:
                counts["num_positive"] += 1
                counts["positive_correct"] += predicted is True
            else:
                counts["num_negative"] += 1
                counts["negative_correct"] += predicted is False
        return cls(**counts)

    @property
    def positive_accuracy(self) -> float | None:
        """Fraction of positives answered yes; None without positives."""
        return _ratio(self.positive_correct, self.num_positive)

    @property
    def negative_accuracy(self) -> float | None:
        """Fraction of negatives answered no; None without negatives."""
        return _ratio(self.negative_correct, self.num_negative)

    @property
    def weighted_accuracy(self) -> float | None:
        """Mean of positive and negative accuracy (Yo'LLaVA's 'weighted'); None if either is."""
        pos, neg = self.positive_accuracy, self.negative_accuracy
        return None if pos is None or neg is None else (pos + neg) / 2

    def to_dict(self) -> dict:
        return {
            "positive_accuracy": self.positive_accuracy,
            "negative_accuracy": self.negative_accuracy,
            "weighted_accuracy": self.weighted_accuracy,
            "num_positive": self.num_positive,
            "num_negative": self.num_negative,
            "positive_correct": self.positive_correct,
            "negative_correct": self.negative_correct,
            "unparsed": self.unparsed,
        }


@dataclass(frozen=True)
class QAResult:
    """Multiple-choice QA accuracy."""

    total: int
    correct: int
    unparsed: int

    @classmethod
    def from_predictions(cls, pairs: Iterable[tuple[str | None, str]]) -> QAResult:
        """Count (predicted, correct) option keys; predicted None is wrong."""
        total = correct = unparsed = 0
        for i, (predicted, answer) in enumerate(pairs):
            if not isinstance(answer, str) or not (predicted is None or isinstance(predicted, str)):
                raise TypeError(f"pair {i} must be (str | None, str), got {(predicted, answer)!r}")
            total += 1
            correct += predicted == answer
            unparsed += predicted is None
        return cls(total, correct, unparsed)

    @property
    def accuracy(self) -> float | None:
        """Fraction answered correctly; None when there are no questions."""
        return _ratio(self.correct, self.total)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "total": self.total, "correct": self.correct,
                "unparsed": self.unparsed}


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str],
                   digits: int = 3) -> str:
    """A GitHub-markdown table of `rows` (one line each) under `columns`.

    Floats are shown with `digits` decimals, None as "-"; `|` and newlines
    in values are escaped. A row lacking a column raises KeyError naming both.
    """
    if not columns:
        raise ValueError("columns must not be empty")
    lines = ["| " + " | ".join(_cell(c, digits) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise KeyError(f"row {i} has no column(s) {missing}")
        lines.append("| " + " | ".join(_cell(row[c], digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: object, digits: int) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return text.replace("|", r"\|").replace("\r", " ").replace("\n", " ")
