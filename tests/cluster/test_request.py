"""The request file: parsing, strict names, per-subject validation, sources on disk and on S3."""

import json
from pathlib import Path

import pytest
import yaml

from cluster.keys import done_key, subject_key
from cluster.packing import make_packs, packs_of_rank
from cluster.personalize import main
from cluster.request import RequestError, SourceUnavailable, check_subjects, load_request
from cluster.store_s3 import S3Store
from tests.cluster.helpers import TINY_RECIPE, photo_folder, write_request
from tests.conftest import random_photo


def test_parses_yaml_and_resolves_relative_paths(tmp_path):
    path = write_request(tmp_path, "file:///tmp/x")
    req = load_request(str(path))
    assert [(s.owner, s.name) for s in req.subjects] == [("alice", "bo"), ("alice", "mug"), ("bob", "bo")]
    assert req.subjects[0].photos == str(tmp_path / "photos" / "alice" / "bo")
    assert req.recipe_config().num_latent == 2


def test_json_and_command_line_overrides(tmp_path):
    photo_folder(tmp_path / "p", 1)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"base_model": "tiny", "store": "/a", "subjects": [
        {"owner": "o", "name": "n", "photos": "p", "description": "a dog"}]}))
    req = load_request(str(path), {"store": "s3://bucket/pre", "base_model": None})
    assert (req.store, req.base_model, req.subjects[0].description) == ("s3://bucket/pre", "tiny", "a dog")


@pytest.mark.parametrize("bad, field", [
    ({"name": "../x"}, "subjects.0.name"), ({"name": "a/b"}, "subjects.0.name"),
    ({"owner": "Alice"}, "subjects.0.owner"), ({"owner": ""}, "subjects.0.owner"),
    ({"name": "x" * 65}, "subjects.0.name"), ({"photoz": "p"}, "subjects.0.photoz"),
])
def test_bad_names_and_fields_fail_at_once_naming_the_field(tmp_path, bad, field):
    entry = {"owner": "o", "name": "n", "photos": "p", **bad}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny", "store": "/a", "subjects": [entry]}))
    with pytest.raises(RequestError, match=f"field {field}"):
        load_request(str(path))


@pytest.mark.parametrize("body, field", [
    ({"store": "/a", "subjects": []}, "base_model"),
    ({"base_model": "tiny", "store": "/a", "subjects": []}, "subjects"),
    ({"base_model": "tiny", "store": "ftp://x", "subjects": [{"owner": "o", "name": "n", "photos": "p"}]}, "store"),
    ({"base_model": "tiny", "store": "/a", "recipe": {"epochz": 1},
      "subjects": [{"owner": "o", "name": "n", "photos": "p"}]}, "recipe"),
    ({"base_model": "tiny", "store": "/a", "extra": 1, "subjects": []}, "extra"),
])
def test_malformed_request(tmp_path, body, field):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(RequestError, match=f"field {field}"):
        load_request(str(path))


def test_command_line_exits_2_naming_the_field(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny", "store": "/a",
                                    "subjects": [{"owner": "o", "name": "../x", "photos": "p"}]}))
    assert main([str(path)]) == 2
    assert "subjects.0.name" in capsys.readouterr().err


def test_bad_subjects_are_reported_and_the_others_kept(tmp_path):
    photo_folder(tmp_path / "good", 1)
    (tmp_path / "empty").mkdir()
    photo_folder(tmp_path / "trunc", 2)
    data = (tmp_path / "trunc" / "2.png").read_bytes()
    (tmp_path / "trunc" / "2.png").write_bytes(data[: len(data) // 2])
    photo_folder(tmp_path / "junk", 3)
    (tmp_path / "junk" / "1.png").write_bytes(b"not an image at all")
    photo_folder(tmp_path / "big", 4, size=120)
    entries = [("o", "good", "good"), ("o", "empty", "empty"), ("o", "trunc", "trunc"), ("o", "junk", "junk"),
               ("o", "big", "big"), ("p", "dup", "good"), ("p", "dup", "good"), ("o", "gone", "nowhere")]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny", "store": "/a", "subjects": [
        {"owner": o, "name": n, "photos": p} for o, n, p in entries]}))
    checked = check_subjects(load_request(str(path)), max_pixels=100 * 100)
    reasons = {c.label: c.reason for c in checked}
    assert reasons["o/good"] is None and len(checked[0].photos) == 3
    assert "no photos" in reasons["o/empty"]
    assert "trunc/2.png" in reasons["o/trunc"] and "decodable" in reasons["o/trunc"]
    assert "junk/1.png" in reasons["o/junk"]
    assert "big/1.png" in reasons["o/big"] and "max_pixels" in reasons["o/big"]
    assert "duplicate" in reasons["p/dup"]
    assert "nowhere" in reasons["o/gone"] and "not a directory" in reasons["o/gone"]


def test_identical_photo_files_count_once(tmp_path):
    folder = photo_folder(tmp_path / "p", 1)
    (folder / "copy.png").write_bytes((folder / "1.png").read_bytes())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny", "store": "/a",
                                    "subjects": [{"owner": "o", "name": "n", "photos": "p"}]}))
    assert len(check_subjects(load_request(str(path)))[0].photos) == 3


def test_request_and_photos_on_s3(s3_client, s3_bucket, s3_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    s3 = S3Store(s3_bucket)
    for i in range(3):
        random_photo(i).save(tmp_path / f"{i}.png")
        s3.put_file(f"photos/alice/bo/{i}.png", tmp_path / f"{i}.png")
    s3.put_file("photos/alice/bo/sub/ignored.png", tmp_path / "0.png")
    s3.put_bytes("photos/alice/bo/notes.txt", b"text")
    body = {"base_model": "tiny", "store": f"s3://{s3_bucket}/store", "recipe": TINY_RECIPE, "subjects": [
        {"owner": "alice", "name": "bo", "photos": f"s3://{s3_bucket}/photos/alice/bo/"},
        {"owner": "bob", "name": "x", "photos": [f"s3://{s3_bucket}/photos/alice/bo/1.png",
                                                 f"s3://{s3_bucket}/photos/missing.png"]}]}
    s3.put_bytes("requests/r.yaml", yaml.safe_dump(body).encode())
    req = load_request(f"s3://{s3_bucket}/requests/r.yaml")
    good, bad = check_subjects(req)
    assert good.valid and [p.source.rsplit("/", 1)[1] for p in good.photos] == ["0.png", "1.png", "2.png"]
    assert not bad.valid and "missing.png" in bad.reason


def test_folders_inside_a_photo_list_are_expanded(tmp_path):
    photo_folder(tmp_path / "a", 1)
    photo_folder(tmp_path / "b", 2, n=2)
    (tmp_path / "b" / "sub").mkdir()
    random_photo(99).save(tmp_path / "b" / "sub" / "deep.png")  # a folder's sub-folders are not read
    (tmp_path / "b" / "notes.txt").write_text("not a photo")
    photo_folder(tmp_path / "c", 3, n=1)
    (tmp_path / "empty").mkdir()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny", "store": "/a", "subjects": [
        {"owner": "o", "name": "mixed", "photos": ["a", "b/", "c/1.png", "a/1.png"]},
        {"owner": "o", "name": "hollow", "photos": ["c/1.png", "empty"]}]}))
    mixed, hollow = check_subjects(load_request(str(path)))
    assert mixed.valid, mixed.reason
    assert [str(Path(p.source).relative_to(tmp_path)) for p in mixed.photos] == [
        "a/1.png", "a/2.png", "a/3.png", "b/1.png", "b/2.png", "c/1.png"]  # a/1.png named twice: kept once
    assert not hollow.valid and hollow.reason == f"photos: no photos found in {str(tmp_path / 'empty')!r}"


def test_s3_prefix_inside_a_photo_list_is_expanded(s3_client, s3_bucket, s3_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    s3 = S3Store(s3_bucket)
    for i in range(3):
        random_photo(i).save(tmp_path / f"{i}.png")
        s3.put_file(f"photos/bo/{i}.png", tmp_path / f"{i}.png")
    s3.put_file("photos/bo/sub/ignored.png", tmp_path / "0.png")
    random_photo(7).save(tmp_path / "7.png")
    s3.put_file("photos/extra.png", tmp_path / "7.png")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny", "store": "/a", "subjects": [
        {"owner": "o", "name": "bo", "photos": [f"s3://{s3_bucket}/photos/bo/", f"s3://{s3_bucket}/photos/extra.png"]},
        {"owner": "o", "name": "none", "photos": [f"s3://{s3_bucket}/photos/extra.png",
                                                   f"s3://{s3_bucket}/photos/nothing/"]}]}))
    bo, none = check_subjects(load_request(str(path)))
    assert [p.source.split("/photos/")[1] for p in bo.photos] == ["bo/0.png", "bo/1.png", "bo/2.png", "extra.png"]
    assert none.reason == f"photos: no photos found in 's3://{s3_bucket}/photos/nothing/'"


def no_credentials(monkeypatch, tmp_path):
    """The AWS chain finds no credentials at all (and asks no instance metadata service)."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def test_an_s3_credentials_error_fails_the_job_instead_of_marking_subjects_invalid(
        s3_client, s3_bucket, s3_endpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    random_photo(1).save(tmp_path / "1.png")
    S3Store(s3_bucket).put_file("photos/x/1.png", tmp_path / "1.png")
    store = tmp_path / "store"
    path = write_request(tmp_path, str(store), subjects=[("alice", "bo")], pool=0, extra=[
        {"owner": "bob", "name": "x", "photos": [f"s3://{s3_bucket}/photos/x/1.png"]}])
    no_credentials(monkeypatch, tmp_path)
    with pytest.raises(SourceUnavailable, match=r"subject bob/x: photos .*NoCredentialsError"):
        check_subjects(load_request(str(path)))
    assert main([str(path), "--local", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: subject bob/x: photos" in err and "NoCredentialsError" in err
    assert not store.exists(), "the job stopped before training anything"


def test_an_s3_credentials_error_in_the_pool_is_not_a_malformed_request(
        s3_client, s3_bucket, s3_endpoint, monkeypatch, tmp_path):
    from cluster.personalize import JobOptions, read_pool

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    path = write_request(tmp_path, "/a", subjects=[("alice", "bo")], pool=0)
    request = load_request(str(path)).model_copy(update={"negatives": f"s3://{s3_bucket}/pool/"})
    checked = check_subjects(request)
    no_credentials(monkeypatch, tmp_path)
    with pytest.raises(SourceUnavailable, match="negatives: photos .*NoCredentialsError"):
        read_pool(request, checked, JobOptions())


def test_a_bug_while_reading_photos_is_not_a_bad_subject(tmp_path, monkeypatch):
    from cluster.personalize import JobOptions, read_pool

    path = write_request(tmp_path, "/a", subjects=[("alice", "bo")], pool=2)
    request = load_request(str(path))

    def broken(uri, data, max_pixels):
        raise TypeError("a bug in the decoder call")

    monkeypatch.setattr("cluster.request.check_decodes", broken)
    with pytest.raises(TypeError, match="a bug"):
        check_subjects(request)
    with pytest.raises(TypeError, match="a bug"):
        read_pool(request, [], JobOptions())


def test_subject_key_depends_on_content_not_order():
    k = subject_key("o", "n", ["b", "a"], {"x": 1}, "fp", None)
    assert k == subject_key("o", "n", ["a", "b", "a"], {"x": 1}, "fp", None)
    others = [subject_key("o", "n", ["a"], {"x": 1}, "fp", None), subject_key("o", "n", ["a", "b"], {"x": 2}, "fp", None),
              subject_key("o", "n", ["a", "b"], {"x": 1}, "fp2", None), subject_key("p", "n", ["a", "b"], {"x": 1}, "fp", None),
              subject_key("o", "n", ["a", "b"], {"x": 1}, "fp", "pool")]
    assert k not in others and len(set(others)) == len(others)
    assert done_key("o", "n", k) == f"done/o/n/{k}.json"
    with pytest.raises(ValueError):
        done_key("o", "n", "../x")


def test_packs_never_repeat_a_name_and_ranks_get_equal_rounds():
    class S:
        def __init__(self, owner, name):
            self.owner, self.name = owner, name
    subs = [S("a", "bo"), S("b", "bo"), S("a", "x"), S("c", "bo"), S("a", "y")]
    packs = make_packs(subs, 2)
    assert all(len({s.name for s in p}) == len(p) <= 2 for p in packs)
    assert sorted(id(s) for p in packs for s in p) == sorted(id(s) for s in subs)
    rounds = [packs_of_rank(packs, r, 2) for r in range(2)]
    assert len(rounds[0]) == len(rounds[1])
    assert [p for r in rounds for p in r if p is not None].__len__() == len(packs)


def test_job_id_is_a_strict_name():
    from cluster.personalize import JobOptions

    with pytest.raises(ValueError, match="job_id"):
        JobOptions(job_id="../jobs")


def test_recipe_from_a_file_then_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text("num_latent: 4\nepochs: 9\nlr: 0.01\n")
    req = tmp_path / "req.yaml"
    req.write_text("base_model: tiny\nstore: /tmp/s\nrecipe: {from: r.yaml, epochs: 2}\n"
                   "subjects: [{owner: a, name: b, photos: [x.png]}]\n")
    r = load_request(str(req)).recipe_config()
    assert (r.num_latent, r.epochs, r.lr) == (4, 2, 0.01)


@pytest.mark.parametrize("ref, match", [("missing.yaml", "recipe.from='missing.yaml'"),
                                        ("s3://b/r.yaml", "local recipe file"),
                                        ("bad.yaml", "unknown recipe fields")])
def test_recipe_file_errors_name_the_field(tmp_path, ref, match):
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    req = tmp_path / "req.yaml"
    req.write_text(f"base_model: tiny\nstore: /tmp/s\nrecipe: {{from: '{ref}'}}\n"
                   "subjects: [{owner: a, name: b, photos: [x.png]}]\n")
    with pytest.raises(RequestError, match=match):
        load_request(str(req))
