"""Per-subject wall time of packed training against pack size, on one process.

    python -m bench.pack_scaling [--subjects 16] [--packs 1 4 16] [--epochs 2] [--repeat 2]

Runs the cluster worker's code (`PackRunner`, the same as a Ray Train worker
runs) on the tiny backbone, for the same N subjects split into packs of P, and
reports seconds per subject (training-set building + training + writing
artifacts, backbone load excluded: a worker loads it once). Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cluster.packing import make_packs
from cluster.store import open_store
from cluster.worker import JobConfig, PackRunner, SubjectTask
from yollava.backbone import load_backbone
from yollava.mining import image_sha256

RECIPE = {"num_latent": 4, "epochs": 2, "hard_negatives": 0, "easy_negatives": 4, "positive_questions": 2,
          "attribute_questions": 2, "max_answer_tokens": 8, "flip": True, "batch_size": 4}


def photo_bytes(seed: int) -> bytes:
    import io

    im = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def subjects(n: int, photos: int) -> list[SubjectTask]:
    out = []
    for i in range(n):
        data = [photo_bytes(1000 * i + j) for j in range(photos)]
        out.append(SubjectTask(f"owner{i % 3}", f"s{i}", f"{i:064x}", [image_sha256(d) for d in data], data))
    return out


def run(pack_size: int, n: int, photos: int, recipe: dict, backbone, pool: dict) -> float:
    with tempfile.TemporaryDirectory() as root:
        tasks = subjects(n, photos)
        job = JobConfig("bench", Path(root).as_uri(), "tiny", backbone.fingerprint, recipe,
                        make_packs(tasks, pack_size), pool_refs=pool)
        runner = PackRunner(job, backbone)
        runner.pool = _easy_pool(pool)
        t0 = time.perf_counter()
        for pack in job.packs:
            runner.run(pack)
        seconds = time.perf_counter() - t0
        assert len(open_store(Path(root).as_uri()).list_concepts()) == n
    return seconds / n


def _easy_pool(pool: dict):
    from yollava.pool import NegativePool

    return NegativePool(list(pool))  # easy negatives only: the tiny tower's embeddings are not meaningful


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--packs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--photos", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    ap.add_argument("--repeat", type=int, default=2, help="runs per pack size; the fastest counts")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    recipe = {**RECIPE, "epochs": args.epochs}
    backbone = load_backbone("tiny")
    pool = {image_sha256(d): d for d in (photo_bytes(90_000 + i) for i in range(16))}
    run(max(args.packs), min(4, args.subjects), args.photos, recipe, backbone, pool)  # warm-up
    rows = {p: min(run(p, args.subjects, args.photos, recipe, backbone, pool) for _ in range(args.repeat))
            for p in args.packs}
    base = rows[args.packs[0]]
    print(f"{'pack size':>9} {'s/subject':>10} {'speed-up':>9}")
    for p, s in rows.items():
        print(f"{p:>9} {s:>10.3f} {base / s:>8.2f}x")
    result = {"bench": "pack_scaling", "backbone": "tiny", "subjects": args.subjects, "recipe": recipe,
              "seconds_per_subject": {str(p): round(s, 4) for p, s in rows.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
