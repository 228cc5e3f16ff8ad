"""The paper's comparison, reproduced on the miniature model and the sample subjects.

    python -m miniworld.reproduce [--data examples/miniworld] [--out runs/reproduce]
        [--seeds 0,1] [--ks 1,4,16]

Methods, all through the same evaluation harness as for real checkpoints
(`yollava.evaluate.Evaluator`):

- `vanilla`: the name `<sks>` with no concept behind it;
- `description`: the subject in words ("<sks> is a red striped circle."), as the
  paper's human-written description (the notch has no word);
- `yollava`: concept tokens, k = 8 started at the subject's photos, hard + easy negatives (`MINI_RECIPE`);
- `no_hard_negatives`: the same number of negatives, all easy (random pool photos);
- `k1`, `k4`, `k16` (and `yollava` as k8): the number of latent tokens.

Recognition on held-out photos: positives are the subject's test photos;
negatives are its twin (the same object but for the unnamed notch: `hard`) and
the other subjects' test photos (`easy`, as the paper). Figures are mean ± std
over subjects × training seeds. Text-only QA asks two-option questions about the
subject without a photo. Writes OUT/results.json, OUT/results.md, OUT/recognition.png
and prints one JSON line last: {method: {pos, neg, weighted}} for vanilla,
description, yollava and no_hard_negatives.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

from miniworld.subjects import DEFAULT_OUT, load_meta
from yollava.backbone import Backbone, load_backbone
from yollava.data import OTHERS, YollavaDataset, load_image
from yollava.evaluate import Evaluator
from yollava.features import FeatureCache
from yollava.metrics import markdown_table
from yollava.pipeline import SubjectSpec, train_concepts
from yollava.pool import build_pool
from yollava.recipe import RecipeConfig

log = logging.getLogger("miniworld.reproduce")

# The recipe on the miniature model, from its one file (its comments say why each value).
RECIPE_FILE = Path(__file__).resolve().parents[1] / "examples" / "mini-recipe.yaml"
MINI_RECIPE = RecipeConfig.from_file(RECIPE_FILE)
PAPER = {"vanilla": 0.500, "description": 0.822, "yollava": 0.924, "no_hard_negatives": 0.754}
KIND_NAMES = {"hard": "hard", OTHERS: "easy"}


def variants(ks: list[int], r: RecipeConfig = MINI_RECIPE) -> dict[str, RecipeConfig]:
    """Trained methods -> recipe (before the seed is set)."""
    out = {"yollava": r,
           "no_hard_negatives": replace(r, hard_negatives=0, easy_negatives=r.hard_negatives + r.easy_negatives)}
    for k in ks:
        if k != r.num_latent:
            out[f"k{k}"] = replace(r, num_latent=k)
    return out


def _rows(results: dict) -> dict[str, dict[str, float]]:
    """Per subject: pos / neg / weighted / negatives by kind / text QA, from Evaluator.run output."""
    out = {}
    for subject, r in results.items():
        rec = r["recognition"]["likelihood"]
        out[subject] = {"pos": rec["positive_accuracy"], "neg": rec["negative_accuracy"],
                        "weighted": rec["weighted_accuracy"], "text_qa": r["qa_text"]["accuracy"],
                        **{f"neg_{KIND_NAMES.get(k, k)}": v
                           for k, v in r["recognition"]["negative_by_kind"].items()},
                        **{f"auc_{KIND_NAMES.get(k, k)}": v
                           for k, v in r["recognition"]["auc_by_kind"].items()}}
        gen = r["recognition"].get("generated")
        if gen is not None:  # answers generated and parsed; the share of those about positives that say the name
            out[subject].update(gen_weighted=gen["weighted_accuracy"], names_said=gen["names_said"])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: dict[str, list[dict[str, dict[str, float]]]]) -> dict[str, dict]:
    """method -> {figure: mean, figure_std: std, n}: over every (subject, seed)."""
    out = {}
    for method, seeds in runs.items():
        cells = [row for per_subject in seeds for row in per_subject.values()]
        figures = sorted({k for row in cells for k in row})
        agg: dict = {"n": len(cells)}
        for f in figures:
            vals = [row[f] for row in cells if row.get(f) is not None]
            if vals:
                agg[f], agg[f"{f}_std"] = _mean_std(vals)
        out[method] = agg
    return out


def table(agg: dict[str, dict]) -> str:
    cols = ["pos", "neg", "neg_hard", "neg_easy", "weighted", "text_qa"]
    rows = []
    for method, a in agg.items():
        row = {"method": method, "n": a["n"], "paper weighted": PAPER.get(method)}
        for c in cols:
            row[c] = f"{a[c]:.3f} ± {a[c + '_std']:.3f}" if c in a else None
        rows.append(row)
    return markdown_table(rows, ["method", "n", *cols, "paper weighted"])


def plot(agg: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(agg)
    figs = [("weighted", "weighted"), ("neg_hard", "hard negatives"), ("neg_easy", "easy negatives"),
            ("pos", "positives")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(figs)
    for i, (key, label) in enumerate(figs):
        xs = [j + (i - (len(figs) - 1) / 2) * width for j in range(len(methods))]
        ax.bar(xs, [agg[m].get(key, 0) for m in methods], width, yerr=[agg[m].get(key + "_std", 0) for m in methods],
               label=label, capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recognition accuracy (held-out)")
    ax.set_title("Yo'LLaVA on the miniature model: mean ± std over subjects × seeds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reproduce(backbone: Backbone, data: Path, out: Path, seeds: list[int], ks: list[int],
              recipes: dict[str, RecipeConfig] | None = None, progress: bool = True,
              baselines: bool = True, generate: bool = False,
              lookalikes: dict[str, list[str]] | None = None) -> dict:
    """`generate`: trained concepts also answer each test photo in generated text (yes/no parsed,
    and whether answers about positives say the name). `lookalikes`: subject -> image keys taken as
    its hard negatives before any mined one (a diagnostic of what hard negatives can teach)."""
    meta = load_meta(data)
    dataset = YollavaDataset.load(data)
    descriptions = {s["name"]: s["description"] + "." for s in meta["subjects"]}
    owners = {s["name"]: s["owner"] for s in meta["subjects"]}
    specs = [SubjectSpec(name, [str(p) for p in s.train_images], owner=owners[name],
                         hard_negatives=tuple((lookalikes or {}).get(name, ())))
             for name, s in dataset.subjects.items()]
    pool = build_pool(str(data / "pool"), backbone, "vision-tower")
    runs: dict[str, list] = {}
    timings: dict[str, float] = {}

    t = time.time()
    features = FeatureCache(backbone, load_image)  # every method asks about the same photos
    if baselines:
        base = Evaluator(backbone, dataset, {}, progress=progress, descriptions=descriptions, features=features)
        results = base.run(["vanilla", "description"])["methods"]
        runs["vanilla"] = [_rows(results["vanilla"])]
        runs["description"] = [_rows(results["description"])]
        timings["baselines"] = time.time() - t

    for method, recipe in (recipes or variants(ks)).items():
        for seed in seeds:
            t = time.time()
            trained = train_concepts(backbone, specs, load_image, pool, replace(recipe, seed=seed),
                                     progress=progress)
            concepts = {name: r.rows for name, r in trained.items()}
            res = Evaluator(backbone, dataset, concepts, generate=generate, progress=False,
                            features=features).run(["concept"])["methods"]["concept"]
            runs.setdefault(method, []).append(_rows(res))
            timings[f"{method}/seed{seed}"] = time.time() - t
            log.info("%s seed %d: %s (%.0f s)", method, seed, aggregate({method: runs[method][-1:]})[method],
                     timings[f"{method}/seed{seed}"])
    agg = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": backbone.model_id, "fingerprint": backbone.fingerprint, "data": str(data),
              "seeds": seeds, "recipe": MINI_RECIPE.to_dict(), "summary": agg, "runs": runs, "timings_s": timings,
              "paper_weighted": PAPER}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(
        "# Yo'LLaVA on the miniature model\n\nRecognition on held-out photos (likelihood of Yes vs No); "
        "mean ± std over subjects × seeds; `neg_hard`: the subject's twin (differs only in the unnamed notch), "
        "`neg_easy`: other subjects' photos. Paper: LLaVA-1.5-13B, 40 subjects.\n\n" + table(agg))
    plot(agg, out / "recognition.png")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="reproduce the paper's comparison on the miniature model")
    ap.add_argument("--data", default=str(DEFAULT_OUT))
    ap.add_argument("--out", default="runs/reproduce")
    ap.add_argument("--model", default="mini")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--ks", default="1,4,16")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    ks = [int(k) for k in args.ks.split(",") if k]
    if len(seeds) < 1 or any(k < 1 for k in ks):
        ap.error(f"--seeds={args.seeds!r} / --ks={args.ks!r}: need at least one seed and k >= 1")
    backbone = load_backbone(args.model)
    report = reproduce(backbone, Path(args.data), Path(args.out), seeds, ks)
    print((Path(args.out) / "results.md").read_text())
    keys = ("vanilla", "description", "yollava", "no_hard_negatives")
    print(json.dumps({m: {f: round(report["summary"][m][f], 4) for f in ("pos", "neg", "weighted")} for m in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
