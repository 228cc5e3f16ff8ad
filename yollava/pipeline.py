"""From photos to trained concepts: negatives, the training sets, packed training, artifacts.

`cluster/` runs the same functions inside Ray workers; this module knows
nothing of Ray or storage: images come from a loader by key, results go back
to the caller.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from yollava import templates
from yollava.artifacts import ConceptArtifact
from yollava.backbone import Backbone
from yollava.generate import GenerationRequest, Generator, SamplingParams
from yollava.mining import easy_negatives, mine_hard_negatives
from yollava.pool import NegativePool
from yollava.prompt import Message
from yollava.recipe import RecipeConfig, TrainingSet, build_training_set
from yollava.tokens import check_name
from yollava.trainer import PackedTrainer, SubjectResult

log = logging.getLogger(__name__)
ImageLoader = Callable[[str], Image.Image]


@dataclass
class SubjectSpec:
    name: str
    photos: list[str]  # image keys the loader understands
    owner: str = "local"
    description: str | None = None
    hard_negatives: tuple[str, ...] = ()  # known look-alikes (image keys): used before mined ones

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        check_name(self.owner, "owner")
        if not self.photos:
            raise ValueError(f"subject {self.owner}/{self.name} has no photos")
        own = set(self.photos).intersection(self.hard_negatives)
        if own:
            raise ValueError(f"subject {self.owner}/{self.name}: hard_negatives holds its own photos {sorted(own)}")
        self.hard_negatives = tuple(self.hard_negatives)


def ask_attributes(generator: Generator, photos: Sequence[Image.Image], config: RecipeConfig
                   ) -> list[tuple[str, str]]:
    """The base model's answers to attribute questions, each while seeing training photos.

    Question i is asked about `attribute_votes` photos, starting at photo i (mod the count), and
    the most common answer is kept; ties go to the first photo asked, so one vote is the paper's
    one look. Returns (question template with `{c}`, answer) pairs for text-only training.
    """
    qs = templates.ATTRIBUTE_QUESTIONS[:config.attribute_questions]
    if not qs:
        return []
    votes = min(config.attribute_votes, len(photos))
    params = SamplingParams(max_new_tokens=config.max_answer_tokens, stop=("\n",))
    reqs = [GenerationRequest([Message("user", seen, images=1)], [], [photos[(i + j) % len(photos)]], params)
            for i, (seen, _) in enumerate(qs) for j in range(votes)]
    texts = [a.text.strip() for a in generator.generate(reqs)]
    out = []
    for i, (_, blind) in enumerate(qs):
        answers = [t for t in texts[i * votes:(i + 1) * votes] if t]
        if answers:  # Counter keeps first-seen order among equal counts
            out.append((blind, Counter(answers).most_common(1)[0][0]))
    return out


def choose_negatives(spec: SubjectSpec, pool: NegativePool, own: np.ndarray | None,
                     config: RecipeConfig) -> tuple[list[str], list[str]]:
    """(hard, easy) negative ids: the subject's known look-alikes, then the nearest non-duplicates
    by embedding up to `config.hard_negatives`, then random others."""
    exclude = set(spec.photos)
    hard = list(dict.fromkeys(spec.hard_negatives))[:config.hard_negatives]
    wanted = config.hard_negatives - len(hard)
    if pool.index is not None and own is not None and wanted > 0:
        hard += [i for i, _ in mine_hard_negatives(pool.index, own, wanted, config.near_duplicate,
                                                   exclude | set(hard))]
    easy = easy_negatives(pool.ids, config.easy_negatives, exclude | set(hard), seed=config.seed)
    return hard, easy


def negatives_for(spec: SubjectSpec, photos: Sequence[Image.Image], pool: NegativePool,
                  config: RecipeConfig) -> tuple[list[str], list[str]]:
    """(hard, easy) as training takes them: the photos embedded by the pool's encoder, then chosen."""
    own = pool.encoder.embed(photos) if pool.encoder is not None and pool.index is not None else None
    return choose_negatives(spec, pool, own, config)


def build_sets(backbone: Backbone, subjects: Sequence[SubjectSpec], load_image: ImageLoader,
               pool: NegativePool, config: RecipeConfig) -> list[TrainingSet]:
    generator = Generator(backbone)
    sets = []
    for spec in subjects:
        photos = [load_image(p) for p in spec.photos]
        hard, easy = negatives_for(spec, photos, pool, config)
        attrs = ask_attributes(generator, photos, config)
        sets.append(build_training_set(spec.name, spec.photos, hard, easy, attrs, config))
        log.info("subject %s/%s: %s", spec.owner, spec.name, sets[-1].counts())
    return sets


def train_concepts(backbone: Backbone, subjects: Sequence[SubjectSpec], load_image: ImageLoader,
                   pool: NegativePool, config: RecipeConfig, progress: bool = True,
                   on_epoch=None) -> dict[str, SubjectResult]:
    """Train every subject in one pack; returns each subject's best rows and metrics."""
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise ValueError(f"a pack trains each concept name once; got {names}")
    sets = build_sets(backbone, subjects, load_image, pool, config)
    trainer = PackedTrainer(backbone, config, load_image, progress=progress)
    return trainer.fit(sets, on_epoch=on_epoch)


def to_artifact(result: SubjectResult, spec: SubjectSpec, backbone: Backbone, config: RecipeConfig,
                version: int = 1) -> ConceptArtifact:
    metrics = {**result.metrics, "best_epoch": result.best_epoch}
    return ConceptArtifact(spec.owner, result.rows, backbone.model_id, backbone.fingerprint, version,
                           recipe=config.to_dict(), metrics=metrics)
