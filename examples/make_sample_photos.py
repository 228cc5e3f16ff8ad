"""Write synthetic sample photos for `examples/request.yaml`: 2 owners x 3 subjects + a negative pool.

    python examples/make_sample_photos.py examples/sample-photos

Each subject is a coloured shape on a noisy background, drawn a few times with
jitter, so a subject's photos resemble each other and differ from the others'.
No binary files are committed: run this first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SUBJECTS = {"alice": ["bo", "mug", "kitty"], "bob": ["bo", "bike", "plant"]}


def subject_photo(seed: int, variant: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed * 1000 + variant)
    base = np.random.default_rng(seed).integers(0, 255, 3)
    im = Image.fromarray(rng.integers(0, 80, (size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(im)
    x, y = rng.integers(4, size // 3, 2)
    r = int(size // 3 + rng.integers(-4, 4))
    shape = draw.ellipse if seed % 2 else draw.rectangle
    shape([x, y, x + r, y + r], fill=tuple(int(c) for c in base))
    return im


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder to write OWNER/SUBJECT/*.png and pool/*.png into")
    ap.add_argument("--photos", type=int, default=4, help="photos per subject")
    ap.add_argument("--pool", type=int, default=24, help="negative pool size")
    args = ap.parse_args(argv)
    out = Path(args.out)
    seed = 1
    for owner, names in SUBJECTS.items():
        for name in names:
            folder = out / owner / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(args.photos):
                subject_photo(seed, i).save(folder / f"{i + 1}.png")
            seed += 1
    (out / "pool").mkdir(parents=True, exist_ok=True)
    for i in range(args.pool):
        subject_photo(100 + i, 0).save(out / "pool" / f"n{i:03d}.png")
    print(f"wrote {sum(len(v) for v in SUBJECTS.values())} subjects and {args.pool} pool images under {out}")


if __name__ == "__main__":
    main()
