"""Photo folders and request files for the cluster tests."""

import yaml

from tests.conftest import random_photo

TINY_RECIPE = {"num_latent": 2, "epochs": 1, "hard_negatives": 2, "easy_negatives": 2,
               "positive_questions": 1, "attribute_questions": 1, "max_answer_tokens": 4,
               "near_duplicate": 1.0, "flip": False, "batch_size": 4}
SUBJECTS = (("alice", "bo"), ("alice", "mug"), ("bob", "bo"))


def photo_folder(root, seed, n=3, size=40):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        random_photo(seed * 10 + i, size).save(root / f"{i + 1}.png")
    return root


def write_request(root, store, subjects=SUBJECTS, pool=6, recipe=None, extra=(), pool_extra=()):
    """A request over fresh photo folders under `root`; `extra` subject entries are appended as is."""
    entries = []
    for seed, (owner, name) in enumerate(subjects, start=1):
        photo_folder(root / "photos" / owner / name, seed)
        entries.append({"owner": owner, "name": name, "photos": f"photos/{owner}/{name}"})
    negatives = None
    if pool:
        folder = root / "pool"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(pool):
            random_photo(900 + i).save(folder / f"n{i}.png")
        negatives = [str(p) for p in sorted(folder.iterdir())] + list(pool_extra)
    body = {"base_model": "tiny", "store": store, "recipe": recipe or TINY_RECIPE,
            "subjects": entries + list(extra)}
    if negatives:
        body["negatives"] = negatives
    path = root / "request.yaml"
    path.write_text(yaml.safe_dump(body))
    return path
