"""Evaluate concepts and baselines on the Yo'LLaVA benchmark layout.

    python -m yollava.evaluate --data DIR --concepts DIR [--model mini|ID|PATH] [--out DIR]
        [--methods concept,vanilla,description,photo] [--generate]

Recognition: for each subject, its test photos are positives and the other
subjects' test photos negatives; "yes" is decided by log p("Yes") > log p("No")
(and, with --generate, also by parsing a generated answer). Multiple-choice
QA: log p("A") against log p("B"), with the photo (visual) and without (text).
Baselines on the same harness: vanilla (the name with no concept), a text
description in the prompt (written by the base model from a training photo),
and a training photo in the prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from yollava.artifacts import load_concept
from yollava.backbone import Backbone, load_backbone
from yollava.concept_model import ConceptLM, ConceptRows
from yollava.data import QAItem, YollavaDataset, load_image, recognition_negatives
from yollava.features import FeatureCache
from yollava.generate import GenerationRequest, Generator, SamplingParams
from yollava.metrics import (QAResult, RecognitionResult, margin_auc, markdown_table, parse_yes_no,
                             yes_no_from_logprobs)
from yollava.prompt import Message, PromptEncoder
from yollava.recipe import PhotoRef
from yollava.scoring import answer_logprobs
from yollava.templates import QA_SUFFIX, RECOGNITION_EVAL_QUESTION

log = logging.getLogger("yollava.evaluate")
METHODS = ("concept", "vanilla", "description", "photo")
ASK_DESCRIPTION = "Describe the main subject of this photo in one sentence."


@dataclass
class Prompting:
    """How one method asks about a subject: leading turns, concepts, leading photos."""

    lead: list[Message]
    concepts: list[ConceptRows]
    photos: list[PhotoRef]


class Evaluator:
    def __init__(self, backbone: Backbone, dataset: YollavaDataset, concepts: dict[str, ConceptRows],
                 generate: bool = False, progress: bool = True, descriptions: dict[str, str] | None = None,
                 features: FeatureCache | None = None):
        """`descriptions`: subject -> words for the description baseline (as the paper's
        human-written ones); subjects without one are described by the base model."""
        self.backbone, self.dataset, self.concepts = backbone, dataset, concepts
        self.lm = ConceptLM(backbone)
        self.encoder = PromptEncoder.for_backbone(backbone)
        self.features = features or FeatureCache(backbone, load_image)
        self.generator = Generator(backbone)
        self.generate, self.progress = generate, progress
        self._descriptions: dict[str, str] = dict(descriptions or {})

    def prompting(self, method: str, subject: str) -> Prompting | None:
        s = self.dataset.subjects[subject]
        c = f"<{subject}>"
        if method == "concept":
            rows = self.concepts.get(subject)
            return Prompting([], [rows], []) if rows is not None else None
        if method == "vanilla":
            return Prompting([], [], [])
        if not s.train_images:
            return None
        if method == "description":
            return Prompting([Message("user", f"{c} is {self.description(subject)}"),
                              Message("assistant", f"Understood, that is {c}.")], [], [])
        if method == "photo":
            return Prompting([Message("user", f"This is {c}.", images=1),
                              Message("assistant", f"Understood, that is {c}.")], [],
                             [PhotoRef(str(s.train_images[0]))])
        raise ValueError(f"method={method!r} is not one of {METHODS}")

    def description(self, subject: str) -> str:
        """The subject in words: given, or written by the base model from a training photo."""
        if subject not in self._descriptions:
            photo = load_image(self.dataset.subjects[subject].train_images[0])
            out = self.generator.generate([GenerationRequest([Message("user", ASK_DESCRIPTION, 1)], [], [photo],
                                                             SamplingParams(max_new_tokens=48, stop=("\n",)))])
            self._descriptions[subject] = out[0].text.strip()
        text = self._descriptions[subject]
        if not text.strip():
            raise ValueError(f"the description of subject {subject!r} is empty: the description baseline "
                             "needs words (give one, or use a base model that answers the description prompt)")
        return text

    def _score(self, p: Prompting, question: str, photo: PhotoRef | None, candidates: Sequence[str]):
        photos = p.photos + ([photo] if photo else [])
        feats = self.features.get(photos) if photos else None
        msgs = [*p.lead, Message("user", question, images=1 if photo else 0)]
        return answer_logprobs(self.lm, self.encoder, msgs, candidates, p.concepts, feats)

    def recognition(self, p: Prompting, subject: str) -> dict:
        """Likelihood (and optionally generated) recognition; negatives also reported by kind."""
        pos = self.dataset.subjects[subject].test_images
        negatives = recognition_negatives(self.dataset, subject)
        q = RECOGNITION_EVAL_QUESTION.format(c=f"<{subject}>")
        items = [(x, True, None) for x in pos] + [(x, False, k) for k, xs in negatives.items() for x in xs]
        pairs, gen_pairs, by_kind = [], [], {k: [] for k, xs in negatives.items() if xs}
        named: list[bool] = []  # generated answers about positives that say `<subject>`
        margins: dict[str, list[float]] = {"positive": [], **{k: [] for k in by_kind}}
        for path, truth, kind in items:
            lp = self._score(p, q, PhotoRef(str(path)), ["Yes", "No"])
            pairs.append((truth, yes_no_from_logprobs(lp[0], lp[1])))
            margins["positive" if kind is None else kind].append(float(lp[0] - lp[1]))
            if kind is not None:
                by_kind[kind].append((truth, pairs[-1][1]))
            if self.generate:
                text = self._generate(p, q, path)
                gen_pairs.append((truth, parse_yes_no(text)))
                if truth:
                    named.append(f"<{subject}>" in text)
        out = {"likelihood": RecognitionResult.from_predictions(pairs).to_dict(),
               "negative_by_kind": {k: RecognitionResult.from_predictions(v).negative_accuracy
                                    for k, v in by_kind.items()},
               # how well the yes-no margin separates positives from each kind of negative
               "auc_by_kind": {k: margin_auc(margins["positive"], margins[k]) for k in by_kind}}
        if self.generate:
            out["generated"] = {**RecognitionResult.from_predictions(gen_pairs).to_dict(),
                                "names_said": sum(named) / len(named) if named else None}
        return out

    def _generate(self, p: Prompting, question: str, path: Path) -> str:
        photos = [load_image(r.key) for r in p.photos] + [load_image(path)]
        req = GenerationRequest([*p.lead, Message("user", question, images=1)], p.concepts, photos,
                                SamplingParams(max_new_tokens=16))
        return self.generator.generate([req])[0].text

    def qa(self, p: Prompting, items: Sequence[QAItem], visual: bool) -> dict:
        pairs = []
        for it in items:
            opts = "\n".join(f"{k}. {v}" for k, v in sorted(it.options.items()))
            q = f"{it.question}\n{opts}{QA_SUFFIX}"
            keys = sorted(it.options)
            lp = self._score(p, q, PhotoRef(str(it.image)) if visual else None, keys)
            if bool(torch.isnan(lp).any()):
                raise ValueError(f"NaN log-probability scoring options {keys} of {it.subject!r}: {lp.tolist()}")
            pairs.append((keys[int(lp.argmax())], it.answer))
        return QAResult.from_predictions(pairs).to_dict()

    @torch.no_grad()
    def run(self, methods: Sequence[str]) -> dict:
        results: dict = {}
        jobs = [(m, s) for m in methods for s in self.dataset.subjects]
        for method, subject in tqdm(jobs, desc="evaluating", disable=not self.progress):
            p = self.prompting(method, subject)
            if p is None:
                log.warning("method %s has nothing for subject %s: skipped", method, subject)
                continue
            items = [q for q in self.dataset.qa if q.subject == subject]
            results.setdefault(method, {})[subject] = {
                "recognition": self.recognition(p, subject),
                "qa_visual": self.qa(p, items, visual=True),
                "qa_text": self.qa(p, items, visual=False),
            }
        return {"model": self.backbone.model_id, "methods": results, "summary": summarize(results)}


def summarize(results: dict) -> list[dict]:
    """One row per method: mean over subjects of each figure (None where none exist)."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    rows = []
    for method, subjects in results.items():
        rec = [v["recognition"]["likelihood"] for v in subjects.values()]
        rows.append({"method": method, "subjects": len(subjects),
                     "positive": mean(r["positive_accuracy"] for r in rec),
                     "negative": mean(r["negative_accuracy"] for r in rec),
                     "weighted": mean(r["weighted_accuracy"] for r in rec),
                     **{f"negative_{k}": mean(v["recognition"]["negative_by_kind"].get(k)
                                              for v in subjects.values())
                        for k in sorted({k for v in subjects.values()
                                         for k in v["recognition"]["negative_by_kind"]})},
                     "visual_qa": mean(v["qa_visual"]["accuracy"] for v in subjects.values()),
                     "text_qa": mean(v["qa_text"]["accuracy"] for v in subjects.values())})
    return rows


TABLE_COLUMNS = ["method", "subjects", "positive", "negative", "weighted", "visual_qa", "text_qa"]


def load_concepts(folder: str | Path | None, backbone: Backbone) -> dict[str, ConceptRows]:
    """Every `<folder>/<name>/manifest.json` concept, checked against this backbone."""
    if not folder:
        return {}
    out = {}
    for manifest in sorted(Path(folder).glob("*/manifest.json")):
        art = load_concept(manifest.parent, expect_fingerprint=backbone.fingerprint)
        out[art.name] = art.rows
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m yollava.evaluate", description=__doc__.split("\n")[1])
    ap.add_argument("--data", required=True, help="dataset root in the Yo'LLaVA layout")
    ap.add_argument("--concepts", help="folder of trained concepts (<name>/manifest.json)")
    ap.add_argument("--model", default="mini", help="HF id, local path, mini (the shipped miniature model, default) or tiny (random)")
    ap.add_argument("--out", default="eval-results", help="folder for results.json and results.md")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--subjects", help="comma-separated subset")
    ap.add_argument("--generate", action="store_true", help="also parse generated yes/no answers")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    backbone = load_backbone(args.model, dtype=args.dtype, device=args.device)
    subjects = args.subjects.split(",") if args.subjects else None
    dataset = YollavaDataset.load(args.data, subjects)
    result = Evaluator(backbone, dataset, load_concepts(args.concepts, backbone), args.generate).run(methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = markdown_table(result["summary"], TABLE_COLUMNS)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
