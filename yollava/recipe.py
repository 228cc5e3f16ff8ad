"""The per-subject training set of Yo'LLaVA, built from a handful of photos.

1. positive recognition: each training photo (and its mirror image) asked
   "is <bo> in this photo?" in varied phrasings -> varied "yes" answers;
2. negative recognition: hard negatives (most similar pool photos) and easy
   random negatives -> "no" answers;
3. text-only conversation: attribute questions the base model answers while
   it sees a training photo, trained *without* the photo.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import yaml

from yollava import templates
from yollava.prompt import Message

Kind = Literal["positive", "negative", "text"]


@dataclass
class RecipeConfig:
    """Counts and optimisation settings; defaults follow the paper."""

    num_latent: int = 16  # k latent tokens per subject
    hard_negatives: int = 100  # most similar pool photos, answered "no"
    easy_negatives: int = 100  # random pool photos, answered "no"
    positive_questions: int = 3  # phrasings asked per training photo (and per flip)
    attribute_questions: int = 10  # text-only questions answered by the base model
    # photos each attribute question is asked about; the most common answer is kept (ties: the first
    # photo asked). 1 is the paper's one look; more outvotes answers about other objects in the photo
    attribute_votes: int = 1
    flip: bool = True  # horizontal-flip augmentation of positives
    near_duplicate: float = 0.95  # cosine at or above which a pool photo counts as the subject's own
    epochs: int = 15
    batch_size: int = 4  # samples per subject per step
    lr: float = 1e-3
    head_lr_scale: float = 1.0  # the output rows' learning rate, as a multiple of lr (only the identifier's is used)
    weight_decay: float = 0.01
    holdout: float = 0.2  # share of recognition samples kept out to pick the best epoch
    max_answer_tokens: int = 48  # length of the base model's attribute answers
    seed: int = 0
    # where the k latent rows start: "mean" (near the mean base row, the paper's), or "photos"
    # (the image tokens that recur across the subject's training photos: the subject itself; one row per
    # photo, rows past the number of photos start near the mean row)
    init: Literal["mean", "photos"] = "mean"

    def __post_init__(self) -> None:
        for name in ("num_latent", "epochs", "batch_size", "positive_questions", "attribute_votes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("hard_negatives", "easy_negatives", "attribute_questions"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.attribute_questions > len(templates.ATTRIBUTE_QUESTIONS):
            raise ValueError(f"attribute_questions={self.attribute_questions}: at most "
                             f"{len(templates.ATTRIBUTE_QUESTIONS)} are written")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout={self.holdout} must be in [0, 1)")
        if not 0 < self.near_duplicate <= 1:
            raise ValueError(f"near_duplicate={self.near_duplicate} must be in (0, 1]")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.head_lr_scale <= 0:
            raise ValueError(f"head_lr_scale={self.head_lr_scale} must be > 0")
        if self.init not in ("mean", "photos"):
            raise ValueError(f"init={self.init!r} must be 'mean' or 'photos'")

    @classmethod
    def from_dict(cls, d: dict) -> "RecipeConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: dict | None = None) -> "RecipeConfig":
        """Recipe fields from a YAML/JSON file (or none), then `overrides` that are not None."""
        base: dict = {}
        if path:
            text = Path(path).read_text()
            try:
                base = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
            except (yaml.YAMLError, json.JSONDecodeError) as e:
                raise ValueError(f"recipe file {str(path)!r} does not parse: {e}") from e
            if not isinstance(base, dict):
                raise ValueError(f"recipe file {str(path)!r} must hold a mapping of recipe fields")
        base.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(base)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PhotoRef:
    """A photo by key (path or pool id), possibly mirrored."""

    key: str
    flip: bool = False


@dataclass
class Sample:
    subject: str
    kind: Kind
    messages: list[Message]
    photo: PhotoRef | None = None


@dataclass
class TrainingSet:
    subject: str
    train: list[Sample]
    holdout: list[Sample] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.train + self.holdout:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out


def recognition_sample(subject: str, photo: PhotoRef, yes: bool, rng: random.Random) -> Sample:
    c = f"<{subject}>"
    q = rng.choice(templates.RECOGNITION_QUESTIONS).format(c=c)
    a = rng.choice(templates.YES_ANSWERS if yes else templates.NO_ANSWERS).format(c=c)
    return Sample(subject, "positive" if yes else "negative",
                  [Message("user", q, images=1), Message("assistant", a)], photo)


def text_sample(subject: str, question: str, answer: str) -> Sample:
    return Sample(subject, "text", [Message("user", question.format(c=f"<{subject}>")),
                                    Message("assistant", answer)])


def build_training_set(subject: str, photos: Sequence[str], hard_negatives: Sequence[str],
                       easy_negatives: Sequence[str], attribute_answers: Sequence[tuple[str, str]],
                       config: RecipeConfig) -> TrainingSet:
    """All samples of one subject; `attribute_answers` are (question template, base answer)."""
    if not photos:
        raise ValueError(f"subject {subject!r} has no training photos")
    own = set(photos)
    leaked = own.intersection(hard_negatives) | own.intersection(easy_negatives)
    if leaked:
        raise ValueError(f"subject {subject!r}: its own photos {sorted(leaked)} are among its negatives")
    rng = random.Random(f"{config.seed}:{subject}")
    flips = (False, True) if config.flip else (False,)
    pos = [recognition_sample(subject, PhotoRef(p, f), True, rng)
           for p in photos for f in flips for _ in range(config.positive_questions)]
    neg = [recognition_sample(subject, PhotoRef(n), False, rng)
           for n in list(hard_negatives) + list(easy_negatives)]
    text = [text_sample(subject, q, a) for q, a in attribute_answers]
    train, holdout = _split_holdout(pos, neg, config.holdout, rng, photos)
    return TrainingSet(subject, train + text, holdout)


def _split_holdout(pos: list[Sample], neg: list[Sample], share: float, rng: random.Random,
                   photos: Sequence[str]) -> tuple[list[Sample], list[Sample]]:
    """Keep whole photos out (both flips, every phrasing) so the holdout is unseen."""
    if share == 0 or len(photos) < 2:
        return pos + neg, []
    keys = sorted(photos)
    rng.shuffle(keys)
    held_photos = set(keys[:max(1, round(share * len(keys)))])
    neg = neg[:]
    rng.shuffle(neg)
    n_neg = round(share * len(neg))
    held = [s for s in pos if s.photo.key in held_photos] + neg[:n_neg]
    kept = [s for s in pos if s.photo.key not in held_photos] + neg[n_neg:]
    return kept, held
