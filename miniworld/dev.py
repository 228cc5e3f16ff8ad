"""Development subjects: the reproduction's figures on subjects of other seeds, to choose a base or a recipe.

    python -m miniworld.dev [--model mini|DIR] [--subject-seeds 7] [--seeds 0]
        [--methods yollava,k4] [--baselines] [--generate] [--set lr=0.01 --set epochs=20]
        [--pool 3000] [--lookalikes] [--count-mined]

The committed sample subjects (seed 2024) are for the final table only; every
choice of base, recipe or initialisation is made here, on subjects generated
with other seeds (written once under runs/dev-subjects/). Prints one JSON line
per (subject seed, method): positive / twin / easy / weighted accuracy and the
AUC of the yes-no margin against each kind of negative; with --generate also the
weighted accuracy of generated answers and the share of answers about the
subject's photos that say `<name>`.

Diagnostics of hard negatives: `--pool N` generates the development subjects
with N pool scenes instead of the committed 300 (the subjects' own photos are
the same); `--lookalikes` takes as hard negatives the pool scenes that hold the
subject's object with another notch, read from the world rather than mined —
what an ideal miner would find — topped up by mining. `--count-mined` trains
nothing: per subject, how many of its mined hard negatives are such look-alikes,
of how many mined, of how many in the pool.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields, replace
from pathlib import Path

from miniworld.reproduce import MINI_RECIPE, reproduce, variants
from miniworld.subjects import POOL, generate, lookalikes, scenes
from yollava.backbone import Backbone, load_backbone
from yollava.data import YollavaDataset, load_image
from yollava.pipeline import SubjectSpec, negatives_for
from yollava.pool import build_pool
from yollava.recipe import RecipeConfig

FIGURES = ("pos", "neg_hard", "neg_easy", "weighted", "auc_hard", "auc_easy", "text_qa", "gen_weighted", "names_said")


def override(recipe: RecipeConfig, assignments: list[str]) -> RecipeConfig:
    """`key=value` pairs typed like the recipe's own fields."""
    types = {f.name: type(getattr(recipe, f.name)) for f in fields(recipe)}
    changes = {}
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set {a!r}: expected FIELD=VALUE with FIELD one of {sorted(types)}")
        changes[key] = value.lower() in ("1", "true", "yes") if types[key] is bool else types[key](value)
    return replace(recipe, **changes)


def dev_subjects(seed: int, root: Path, pool: int = POOL) -> Path:
    out = root / (f"seed{seed}" if pool == POOL else f"seed{seed}-pool{pool}")
    if not (out / "subjects.json").is_file():
        generate(out, seed, pool)
    return out


def world_lookalikes(seed: int, pool: int, data: Path) -> dict[str, list[str]]:
    """Subject -> the pool images (paths under `data`) holding its object with another notch."""
    subjects, all_scenes = scenes(seed, pool)
    return {s.name: [str(data / p) for p in lookalikes(s, all_scenes)] for s in subjects}


def count_mined(backbone: Backbone, data: Path, seed: int, pool: int, recipe: RecipeConfig
                ) -> dict[str, list[int]]:
    """Subject -> [look-alikes among its mined hard negatives, mined, look-alikes in the pool]:
    the negatives training would mine (the same function), checked against the world's labels."""
    negatives = build_pool(str(data / "pool"), backbone, "vision-tower")
    alike = world_lookalikes(seed, pool, data)
    out = {}
    for name, subject in YollavaDataset.load(data).subjects.items():
        spec = SubjectSpec(name, [str(p) for p in subject.train_images])
        hard, _ = negatives_for(spec, [load_image(p) for p in spec.photos], negatives, recipe)
        out[name] = [len(set(hard) & set(alike[name])), len(hard), len(alike[name])]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m miniworld.dev", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mini")
    ap.add_argument("--subject-seeds", default="7")
    ap.add_argument("--seeds", default="0", help="training seeds")
    ap.add_argument("--methods", default="yollava", help="of: yollava, no_hard_negatives, k1, k4")
    ap.add_argument("--baselines", action="store_true", help="also vanilla and description")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="recipe override")
    ap.add_argument("--generate", action="store_true", help="also generated answers: yes/no parsed "
                    "(gen_weighted) and the share about positives that say the name (names_said)")
    ap.add_argument("--pool", type=int, default=POOL, help="pool scenes of the development subjects")
    ap.add_argument("--lookalikes", action="store_true", help="hard negatives: the pool scenes holding the "
                    "subject's object with another notch (from the world, not mined), topped up by mining")
    ap.add_argument("--count-mined", action="store_true", help="train nothing; per subject: look-alikes "
                    "among its mined hard negatives, mined, look-alikes in the pool")
    ap.add_argument("--out", default="runs/dev")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if 2024 in [int(s) for s in args.subject_seeds.split(",")]:
        ap.error("--subject-seeds: 2024 is the committed sample subjects' seed; develop on others")
    if args.pool < 1:
        ap.error(f"--pool {args.pool}: need at least one pool scene")
    recipe = override(MINI_RECIPE, args.set)
    every = variants([1, 4, 16], recipe)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in every]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {sorted(every)}")
    backbone = load_backbone(args.model)
    for subject_seed in [int(s) for s in args.subject_seeds.split(",")]:
        data = dev_subjects(subject_seed, Path(args.out).parent / "dev-subjects", args.pool)
        if args.count_mined:
            print(json.dumps({"subjects": subject_seed, "mined_lookalikes":
                              count_mined(backbone, data, subject_seed, args.pool, recipe)}), flush=True)
            continue
        alike = world_lookalikes(subject_seed, args.pool, data) if args.lookalikes else None
        report = reproduce(backbone, data, Path(args.out) / f"subjects{subject_seed}",
                           [int(s) for s in args.seeds.split(",")], [], {m: every[m] for m in methods},
                           progress=False, baselines=args.baselines, generate=args.generate, lookalikes=alike)
        for method, agg in report["summary"].items():
            print(json.dumps({"subjects": subject_seed, "method": method,
                              **{f: round(agg[f], 3) for f in FIGURES if f in agg}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
