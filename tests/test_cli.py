"""The one-machine entry points end to end on the tiny backbone."""

import json

import pytest

from tests.conftest import random_photo
from yollava import evaluate, train


def make_dataset(root, subjects=("bo", "mam"), n_train=3, n_test=2):
    qa = {}
    for s_i, s in enumerate(subjects):
        for split, n in (("train", n_train), ("test", n_test)):
            d = root / split / s
            d.mkdir(parents=True)
            for i in range(n):
                random_photo(100 * s_i + 10 * (split == "test") + i).save(d / f"{i + 1}.png")
        qa[s] = {f"./yollava-data/test/{s}/{i + 1}.png": {
            "question": "What colour is <sks>?", "options": {"A": "red", "B": "blue"},
            "correct_answer": "A" if i % 2 else "B"} for i in range(n_test)}
    (root / "yollava-visual-qa.json").write_text(json.dumps(qa))
    pool = root / "pool"
    pool.mkdir()
    for i in range(12):
        random_photo(500 + i).save(pool / f"n{i}.png")
    return root


def test_train_then_evaluate(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_latent: 3\nhard_negatives: 3\neasy_negatives: 3\npositive_questions: 1\n"
                      "attribute_questions: 2\nepochs: 2\nmax_answer_tokens: 6\n")
    for name in ("bo", "mam"):
        rc = train.main(["--photos", str(data / "train" / name), "--name", name, "--model", "tiny",
                         "--out", str(tmp_path / "concepts"), "--negatives", str(data / "pool"),
                         "--recipe", str(recipe), "--owner", "alice"])
        assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["best_epoch"] in (1, 2)
    manifest = json.loads((tmp_path / "concepts" / "mam" / "manifest.json").read_text())
    assert manifest["owner"] == "alice" and manifest["recipe"]["num_latent"] == 3
    assert manifest["metrics"]["best_epoch"] == out["best_epoch"]

    rc = evaluate.main(["--data", str(data), "--concepts", str(tmp_path / "concepts"), "--model", "tiny",
                        "--out", str(tmp_path / "eval"), "--methods", "concept,vanilla,photo,description"])
    assert rc == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {r["method"]: r for r in result["summary"]}
    assert set(rows) == {"concept", "vanilla", "photo", "description"}
    for r in rows.values():
        assert r["subjects"] == 2
        for k in ("positive", "negative", "weighted", "visual_qa", "text_qa"):
            assert 0.0 <= r[k] <= 1.0
        assert r["weighted"] == (r["positive"] + r["negative"]) / 2
    rec = result["methods"]["concept"]["bo"]["recognition"]["likelihood"]
    assert (rec["num_positive"], rec["num_negative"]) == (2, 2)  # its test photos vs the other's
    assert "| concept |" in (tmp_path / "eval" / "results.md").read_text()
    # the harness reports what the model says: recompute one subject's recognition directly
    for method in ("concept", "vanilla"):
        want = direct_recognition(data, tmp_path / "concepts", "bo", method)
        got = result["methods"][method]["bo"]["recognition"]
        assert (got["likelihood"]["positive_correct"], got["likelihood"]["negative_correct"]) == want["correct"]
        assert got["auc_by_kind"]["others"] == pytest.approx(want["auc"])


def direct_recognition(data, concepts, subject, method) -> dict:
    """Yes/no margins straight from the model (no harness): correct answers and the AUC."""
    from yollava.artifacts import load_concept
    from yollava.backbone import load_backbone
    from yollava.concept_model import ConceptLM
    from yollava.data import load_image
    from yollava.prompt import Message, PromptEncoder
    from yollava.scoring import answer_logprobs
    from yollava.templates import RECOGNITION_EVAL_QUESTION

    bb = load_backbone("tiny")
    lm, enc = ConceptLM(bb), PromptEncoder.for_backbone(bb)
    rows = [load_concept(concepts / subject).rows] if method == "concept" else []
    q = RECOGNITION_EVAL_QUESTION.format(c=f"<{subject}>")
    margins = {}
    for truth, folder in ((True, data / "test" / subject), (False, data / "test" / "mam")):
        for path in sorted(folder.glob("*.png")):
            feats = bb.image_features(bb.preprocess([load_image(path)]))
            lp = answer_logprobs(lm, enc, [Message("user", q, 1)], ["Yes", "No"], rows, feats)
            margins.setdefault(truth, []).append(float(lp[0] - lp[1]))
    pos, neg = margins[True], margins[False]
    auc = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    return {"correct": (sum(m > 0 for m in pos), sum(m <= 0 for m in neg)), "auc": auc}


def test_train_rejects_bad_name(tmp_path):
    data = make_dataset(tmp_path / "data", subjects=("bo",))
    with pytest.raises(ValueError, match="name='Bo!'"):
        train.main(["--photos", str(data / "train" / "bo"), "--name", "Bo!", "--model", "tiny",
                    "--out", str(tmp_path / "c")])
