import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import random_photo, random_rows
from yollava.artifacts import (MANIFEST_FILE, TENSORS_FILE, ArtifactError, ConceptArtifact, load_concept,
                               save_concept)
from yollava.backbone import load_backbone
from yollava.generate import GenerationRequest, Generator, SamplingParams
from yollava.prompt import Message


@pytest.fixture
def saved(tiny, tmp_path):
    art = ConceptArtifact("alice", random_rows(tiny, "bo", k=4, seed=9, scale=3), "tiny", tiny.fingerprint,
                          recipe={"lr": 1e-3}, metrics={"weighted": 0.9})
    return art, save_concept(tmp_path / "bo", art)


def test_save_load_identical_outputs(tiny, saved):
    art, path = saved
    back = load_concept(path, expect_fingerprint=tiny.fingerprint)
    assert torch.equal(back.rows.embed, art.rows.embed) and torch.equal(back.rows.head, art.rows.head)
    assert (back.owner, back.name, back.version, back.recipe, back.metrics) == ("alice", "bo", 1, {"lr": 1e-3},
                                                                              {"weighted": 0.9})
    req = lambda rows: GenerationRequest([Message("user", "Is <bo> here?", 1)], [rows], [random_photo(2)],
                                         SamplingParams(max_new_tokens=8))
    gen = Generator(tiny)
    assert gen.generate([req(back.rows)])[0].token_ids == gen.generate([req(art.rows)])[0].token_ids


def test_manifest_fields(saved):
    _, path = saved
    m = json.loads((path / MANIFEST_FILE).read_text())
    assert set(m) == {"format_version", "owner", "name", "version", "tokens", "base_model", "base_fingerprint",
                      "recipe", "metrics", "created", "shape", "tensors_sha256", "manifest_sha256", "source"}
    assert m["source"] == {}  # trained here; an imported concept names its files (tests/test_official.py)
    assert m["tokens"][:2] == ["<bo>", "<bo_1>"] and len(m["tokens"]) == 5
    assert set(load_file(path / TENSORS_FILE)) == {"embed", "head"}


def test_tampered_tensor_refused(saved):
    _, path = saved
    t = load_file(path / TENSORS_FILE)
    t["embed"][0, 0] += 1e-3
    save_file(t, path / TENSORS_FILE)
    with pytest.raises(ArtifactError, match="sha256"):
        load_concept(path)


def test_edited_manifest_refused(saved):
    _, path = saved
    m = json.loads((path / MANIFEST_FILE).read_text())
    m["owner"] = "mallory"
    (path / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="edited"):
        load_concept(path)


def test_wrong_shape_refused(saved):
    _, path = saved
    t = load_file(path / TENSORS_FILE)
    save_file({"embed": t["embed"][:3], "head": t["head"][:3]}, path / TENSORS_FILE)
    with pytest.raises(ArtifactError, match="shape"):
        load_concept(path)


def test_other_base_refused(saved):
    _, path = saved
    other = load_backbone("tiny", seed=1)
    with pytest.raises(ArtifactError, match="base_model='tiny'"):
        load_concept(path, expect_fingerprint=other.fingerprint)


def test_not_json_and_missing_files(saved, tmp_path):
    _, path = saved
    (path / MANIFEST_FILE).write_bytes(b"\x80not json")
    with pytest.raises(ArtifactError, match="JSON"):
        load_concept(path)
    with pytest.raises(ArtifactError, match="manifest.json"):
        load_concept(tmp_path / "empty")


def test_bad_owner_refused_on_save(tiny, tmp_path):
    art = ConceptArtifact("../etc", random_rows(tiny, "bo"), "tiny", tiny.fingerprint)
    with pytest.raises(ValueError, match="owner='../etc'"):
        save_concept(tmp_path / "x", art)


def test_manifest_without_source_still_loads(tiny, saved):
    """Manifests written before the `source` field load, with source {}; a wrong type is refused."""
    from yollava.artifacts import _manifest_digest

    _, path = saved
    m = json.loads((path / MANIFEST_FILE).read_text())
    del m["source"]
    m["manifest_sha256"] = _manifest_digest(m)
    (path / MANIFEST_FILE).write_text(json.dumps(m))
    back = load_concept(path, expect_fingerprint=tiny.fingerprint)
    assert back.source == {} and back.owner == "alice"
    m["source"] = "github"
    m["manifest_sha256"] = _manifest_digest(m)
    (path / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="source='github' must be an object"):
        load_concept(path)


def test_source_round_trips(tiny, tmp_path):
    src = {"format": "yollava-official", "token_file": "3-token.pt", "token_sha256": "ab" * 32}
    art = ConceptArtifact("alice", random_rows(tiny, "bo", k=2), "tiny", tiny.fingerprint, source=src)
    assert load_concept(save_concept(tmp_path / "bo", art)).source == src
