"""Packed trainer vs the official Yo'LLaVA loop: samples per second, side by side.

    python -m bench.train_throughput [--small] [--subjects 4] [--epochs 2]

Same backbone (a small random LLaVA, not the test `tiny`), same samples, same
epochs. The last line printed is one JSON object:
{"packed_samples_per_s": …, "official_samples_per_s": …, "ratio": …}
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from bench.official_loop import train_official
from yollava.backbone import Backbone
from yollava.recipe import RecipeConfig, build_training_set
from yollava.tiny import TinySizes, build_tiny_llava
from yollava.trainer import PackedTrainer

BENCH = TinySizes(vision_hidden=128, vision_layers=4, vision_heads=4, image_size=128, patch=8,
                  text_hidden=256, text_layers=4, text_heads=8, text_kv_heads=4, vocab_size=8192)
SMALL = TinySizes()
ATTR = [("What colour is {c}?", "It is a warm reddish brown with a lighter patch."),
        ("Describe {c} in one sentence.", "A small round thing with a striped pattern and a notch.")]


def photo(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def workload(n_subjects: int, cfg: RecipeConfig, photos_per_subject: int, size: int):
    images, sets = {}, []
    for s in range(n_subjects):
        own = [f"s{s}_{i}" for i in range(photos_per_subject)]
        negs = [f"n{s}_{i}" for i in range(cfg.hard_negatives + cfg.easy_negatives)]
        for j, key in enumerate(own + negs):
            images[key] = photo(1000 * s + j, size)
        sets.append(build_training_set(f"subject{s}", own, negs[:cfg.hard_negatives],
                                       negs[cfg.hard_negatives:], ATTR * (cfg.attribute_questions // 2), cfg))
    return images, sets


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes and counts (the test suite's run)")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    sizes = SMALL if args.small else BENCH
    cfg = RecipeConfig(num_latent=16 if not args.small else 4, hard_negatives=10 if not args.small else 2,
                       easy_negatives=10 if not args.small else 2, positive_questions=1,
                       attribute_questions=4 if not args.small else 2, epochs=args.epochs,
                       batch_size=args.batch_size, holdout=0.0)
    model, tok, proc = build_tiny_llava(seed=0, sizes=sizes)
    backbone = Backbone("bench", model, tok, proc)
    images, sets = workload(args.subjects if not args.small else 2, cfg, 5 if not args.small else 2,
                            sizes.image_size)
    n_samples = sum(len(ts.train) for ts in sets) * cfg.epochs

    t0 = time.perf_counter()
    PackedTrainer(backbone, cfg, images.__getitem__, progress=False).fit(sets)
    packed_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for ts in sets:
        train_official(backbone, ts, cfg, images.__getitem__)
    official_s = time.perf_counter() - t0

    result = {"packed_samples_per_s": round(n_samples / packed_s, 2),
              "official_samples_per_s": round(n_samples / official_s, 2),
              "ratio": round(official_s / packed_s, 2)}
    print(f"samples: {n_samples} ({len(sets)} subjects x {len(sets[0].train)} x {cfg.epochs} epochs), "
          f"threads: {torch.get_num_threads()}")
    print(f"packed:   {packed_s:8.2f} s  {result['packed_samples_per_s']:8.2f} samples/s")
    print(f"official: {official_s:8.2f} s  {result['official_samples_per_s']:8.2f} samples/s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
