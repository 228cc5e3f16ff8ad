"""Sample subjects of the miniature world, in the Yo'LLaVA dataset layout.

    python -m miniworld.subjects [--out examples/miniworld] [--check]

Six subjects of two owners (`ana`, `ben`); each is one object of the world,
photographed in scenes with up to two other objects:

    OUT/train/<name>/*.png               8 training photos
    OUT/test/<name>/*.png                10 held-out photos (positives)
    OUT/test/<name>/negatives/hard/*.png 10 held-out photos of the subject's twin:
                                         the same object but for the unnamed notch
    OUT/pool/*.png                       300 scenes for negatives (no subject in any)
    OUT/yollava-visual-qa.json           multiple-choice questions per subject
    OUT/subjects.json                    owners, and each subject in words

No scene other than a subject's own holds that subject, and no distractor is a
subject or a subject's twin, so every label is right by construction. The
other subjects' test photos are the easy negatives, as in the paper. Files are
deterministic in the seed: `--check` regenerates them into a temporary folder
and compares bytes with OUT.
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from miniworld import world
from miniworld.tasks import ASK, ATTRS, VALUES, in_words
from miniworld.world import Obj

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "examples" / "miniworld"
OWNERS = {"ana": ("pip", "zola", "kiki"), "ben": ("rex", "momo", "tuk")}
SEED = 2024
TRAIN, TEST, HARD, POOL = 8, 10, 10, 300


@dataclass(frozen=True)
class SampleSubject:
    owner: str
    name: str
    obj: Obj

    @property
    def twin(self) -> Obj:
        """The hard negative: the same object but for the notch (no word tells them apart)."""
        return Obj(self.obj.shape, self.obj.colour, self.obj.pattern, (self.obj.notch + 1) % 4)

    @property
    def description(self) -> str:
        """In the words pretraining used: 'a red plain circle' (the notch has none)."""
        return in_words(self.obj)


def sample_subjects(seed: int = SEED) -> list[SampleSubject]:
    """Six distinct objects, no two of the same shape and colour (so words tell subjects apart)."""
    rng = random.Random(seed)
    chosen: list[Obj] = []
    while len(chosen) < sum(len(v) for v in OWNERS.values()):
        o = rng.choice(world.ALL_OBJECTS)
        if all((o.shape, o.colour) != (c.shape, c.colour) for c in chosen):
            chosen.append(o)
    names = [(owner, name) for owner, ns in OWNERS.items() for name in ns]
    return [SampleSubject(owner, name, o) for (owner, name), o in zip(names, chosen)]


def _png(scene: world.Scene) -> bytes:
    buf = io.BytesIO()
    scene.render().save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _qa(s: SampleSubject, rng: random.Random) -> dict[str, dict]:
    """Two-option questions about the subject's words (answerable from a concept, without the photo)."""
    out = {}
    for i, attr in enumerate(ATTRS):
        truth = getattr(s.obj, attr)
        wrong = rng.choice([v for v in VALUES[attr] if v != truth])
        opts = [truth, wrong]
        rng.shuffle(opts)
        q = ASK[attr].format(c="<sks>").capitalize()
        out[f"./yollava-data/test/{s.name}/{i}.png"] = {
            "question": q, "options": {"A": opts[0], "B": opts[1]},
            "correct_answer": "A" if opts[0] == truth else "B"}
    return out


def _draw(seed: int, pool: int) -> tuple[list[SampleSubject], dict[str, world.Scene], dict[str, dict]]:
    """Subjects, scenes by file path, questions: all from one seeded generator, in a fixed order."""
    subjects = sample_subjects(seed)
    rng = random.Random(seed + 1)
    banned = {s.obj for s in subjects} | {s.twin for s in subjects}
    others = tuple(o for o in world.ALL_OBJECTS if o not in banned)
    out: dict[str, world.Scene] = {}

    def draw(folder: str, must: list[Obj], n: int) -> None:
        for i in range(n):
            out[f"{folder}/{i:03d}.png" if folder == "pool" else f"{folder}/{i}.png"] = world.random_scene(
                rng, must=must, n_objects=(1, 3), pool=others)

    for s in subjects:
        draw(f"train/{s.name}", [s.obj], TRAIN)
        draw(f"test/{s.name}", [s.obj], TEST)
        draw(f"test/{s.name}/negatives/hard", [s.twin], HARD)
    draw("pool", [], pool)
    qa = {s.name: _qa(s, rng) for s in subjects}
    return subjects, out, qa


def scenes(seed: int = SEED, pool: int = POOL) -> tuple[list[SampleSubject], dict[str, world.Scene]]:
    """The subjects, and every scene of the dataset by its file path (`train/pip/0.png`, `pool/007.png`).

    A larger `pool` keeps every train / test scene and the smaller pool's scenes as its first ones
    (the questions are drawn after the pool, so their wrong options differ with `pool`).
    """
    subjects, out, _ = _draw(seed, pool)
    return subjects, out


def lookalikes(subject: SampleSubject, all_scenes: dict[str, world.Scene]) -> list[str]:
    """Pool scenes (paths, sorted) holding the subject's object with another notch — never the
    twin's notch, which no distractor has: what an ideal hard-negative miner would return."""
    key = (subject.obj.shape, subject.obj.colour, subject.obj.pattern)
    return sorted(p for p, sc in all_scenes.items()
                  if p.startswith("pool/") and any((o.shape, o.colour, o.pattern) == key for o in sc.objects()))


def generate(out: Path, seed: int = SEED, pool: int = POOL) -> list[SampleSubject]:
    """Write the dataset (`pool` scenes for negatives; the committed subjects use POOL)."""
    subjects, all_scenes, qa = _draw(seed, pool)
    files = {rel: _png(sc) for rel, sc in all_scenes.items()}
    meta = {"seed": seed, "subjects": [{"owner": s.owner, "name": s.name, "description": s.description,
                                        "object": vars(s.obj), "twin_notch": s.twin.notch} for s in subjects]}
    files["yollava-visual-qa.json"] = (json.dumps(qa, indent=1, sort_keys=True) + "\n").encode()
    files["subjects.json"] = (json.dumps(meta, indent=1) + "\n").encode()
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return subjects


def differences(out: Path, seed: int = SEED) -> list[str]:
    """Files that differ between OUT and a fresh generation (missing, extra or changed)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), seed)
        fresh = {p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file()}
        have = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} if out.is_dir() else set()
        bad = sorted(fresh ^ have)
        bad += sorted(r for r in fresh & have if not filecmp.cmp(Path(tmp) / r, out / r, shallow=False))
    return bad


def load_meta(root: Path = DEFAULT_OUT) -> dict:
    return json.loads((root / "subjects.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="generate the miniature world's sample subjects")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--check", action="store_true", help="compare OUT with a fresh generation, write nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.check:
        bad = differences(out, args.seed)
        for b in bad[:20]:
            print(f"differs: {b}", file=sys.stderr)
        return 1 if bad else 0
    subjects = generate(out, args.seed)
    for s in subjects:
        print(f"{s.owner}/{s.name}: {s.description} (notch {s.obj.notch}; twin notch {s.twin.notch})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
