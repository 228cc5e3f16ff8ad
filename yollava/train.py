"""Personalize one subject on one machine, without Ray.

    python -m yollava.train --photos DIR --name NAME --out DIR [--model mini|ID|PATH]
        [--negatives POOL_DIR] [--encoder vision-tower|open_clip:MODEL[:WEIGHTS]]
        [--recipe FILE.json|yaml] [--epochs N] [--lr LR] [--num-latent K] [--owner OWNER]

Writes OUT/NAME/concept.safetensors + manifest.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from yollava.artifacts import save_concept
from yollava.backbone import load_backbone
from yollava.data import list_images, load_image
from yollava.pipeline import SubjectSpec, to_artifact, train_concepts
from yollava.pool import build_pool
from yollava.recipe import RecipeConfig

log = logging.getLogger("yollava.train")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m yollava.train", description=__doc__.split("\n")[1])
    ap.add_argument("--photos", required=True, help="folder of the subject's training photos")
    ap.add_argument("--name", required=True, help="concept name: <NAME> in prompts")
    ap.add_argument("--model", default="mini", help="HF id, local path, mini (the shipped miniature model, default) or tiny (random)")
    ap.add_argument("--out", required=True, help="folder to write OUT/NAME/ into")
    ap.add_argument("--owner", default="local")
    ap.add_argument("--negatives", help="folder of pool images for hard/easy negatives")
    ap.add_argument("--encoder", default="vision-tower", help="image encoder for mining")
    ap.add_argument("--recipe", help="JSON/YAML file of recipe fields")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--num-latent", type=int, dest="num_latent")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    config = RecipeConfig.from_file(args.recipe, {"epochs": args.epochs, "lr": args.lr, "num_latent": args.num_latent,
                                       "seed": args.seed})
    photos = [str(p) for p in list_images(Path(args.photos))]
    spec = SubjectSpec(args.name, photos, owner=args.owner)  # validates name, owner, photos
    backbone = load_backbone(args.model, dtype=args.dtype, device=args.device)
    pool = build_pool(args.negatives, backbone, args.encoder)
    results = train_concepts(backbone, [spec], load_image, pool, config)
    out = save_concept(Path(args.out) / spec.name, to_artifact(results[spec.name], spec, backbone, config))
    print(json.dumps({"concept": str(out), "best_epoch": results[spec.name].best_epoch,
                      "metrics": results[spec.name].metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
