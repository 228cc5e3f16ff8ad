"""Who may ask for what: owner -> allowed photo prefixes, checked on the driver first (issue 15, 6)."""

import json

import pytest
import yaml

from cluster.personalize import main
from cluster.policy import POLICY_KEY, OwnerPolicy, PolicyError
from cluster.store import open_store
from tests.cluster.helpers import photo_folder, write_request


def policy_doc(root, **extra):
    return {"owners": {"alice": [f"{root}/photos/alice/"], "bob": [f"{root}/photos/bob/"]},
            "negatives": [f"{root}/pool/"], **extra}


def with_policy(tmp_path, subjects, pool=0, doc=None, extra=()):
    store_dir = tmp_path / "store"
    path = write_request(tmp_path, str(store_dir), subjects=subjects, pool=pool, extra=extra)
    store = open_store(str(store_dir))
    store.put_bytes(POLICY_KEY, yaml.safe_dump(doc or policy_doc(tmp_path)).encode())
    return path, store


def submit(path, capsys, *extra):
    code = main([str(path), "--local", "--no-progress", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def nothing_trained(store):
    return store.list_concepts() == [] and store.list_prefix("jobs") == [] and store.list_prefix("done") == []


def test_a_request_within_the_policy_trains(tmp_path, capsys):
    path, store = with_policy(tmp_path, [("alice", "bo"), ("bob", "cup")], pool=3)
    code, out, _ = submit(path, capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["counts"] == {"trained": 2}


def test_a_subject_on_another_owners_photos_is_refused_and_nothing_trains(tmp_path, capsys):
    photo_folder(tmp_path / "photos" / "alice" / "bo", 1)
    path, store = with_policy(tmp_path, [("alice", "mug")],
                              extra=[{"owner": "bob", "name": "bo", "photos": "photos/alice/bo"}])
    code, _, err = submit(path, capsys)
    assert code == 2
    assert "policy" in err and "bob/bo" in err and f"{tmp_path}/photos/alice/bo" in err
    assert nothing_trained(store)


def test_a_symlink_out_of_the_owners_folder_is_refused(tmp_path, capsys):
    alice = photo_folder(tmp_path / "photos" / "alice" / "bo", 1)
    bob = photo_folder(tmp_path / "photos" / "bob" / "cup", 2)
    (bob / "9.png").symlink_to(alice / "1.png")  # named as bob's, is alice's
    path, store = with_policy(tmp_path, [("alice", "mug")], extra=[
        {"owner": "bob", "name": "cup", "photos": [str(bob / "1.png"), str(bob / "9.png")]}])
    code, _, err = submit(path, capsys)
    assert code == 2 and "bob/cup" in err and f"{alice}/1.png" in err
    assert nothing_trained(store)


def test_an_owner_without_a_policy_entry_is_refused(tmp_path, capsys):
    path, store = with_policy(tmp_path, [("alice", "bo"), ("carol", "cat")])
    code, _, err = submit(path, capsys)
    assert code == 2 and "owner='carol'" in err
    assert nothing_trained(store)


def test_negatives_outside_the_allowed_pool_are_refused(tmp_path, capsys):
    photo_folder(tmp_path / "photos" / "alice" / "bo", 1)
    path, store = with_policy(tmp_path, [("bob", "cup")], pool=2,
                              doc=policy_doc(tmp_path, negatives=[f"{tmp_path}/elsewhere/"]))
    code, _, err = submit(path, capsys)
    assert code == 2 and "negatives" in err
    assert nothing_trained(store)


def test_the_option_names_the_policy_and_wins_over_the_store(tmp_path, capsys):
    path, store = with_policy(tmp_path, [("alice", "bo")])
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"owners": {"bob": [f"{tmp_path}/photos/bob/"]}}))
    code, _, err = submit(path, capsys, "--policy", str(strict))
    assert code == 2 and "owner='alice'" in err
    assert nothing_trained(store)


def test_a_malformed_policy_names_the_field(tmp_path, capsys):
    path, store = with_policy(tmp_path, [("alice", "bo")], doc={"owners": {"alice": ["relative/path/"]}})
    code, _, err = submit(path, capsys)
    assert code == 2 and "owners.alice" in err and "relative/path/" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"owners": {"alice": [f"{tmp_path}/x/"]}, "ownerz": {}}))
    code, _, err = submit(path, capsys, "--policy", str(bad))
    assert code == 2 and "ownerz" in err
    code, _, err = submit(path, capsys, "--policy", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err


def test_prefixes_match_whole_folders_only():
    policy = OwnerPolicy.model_validate({"owners": {"alice": ["s3://bucket/photos/alice", "/data/alice/"]},
                                         "negatives": ["s3://bucket/pool/"]})
    assert policy.allows("alice", "s3://bucket/photos/alice/1.png")
    assert policy.allows("alice", "s3://bucket/photos/alice/sub/2.png")
    assert not policy.allows("alice", "s3://bucket/photos/alice2/1.png")  # a sibling sharing its first letters
    assert not policy.allows("alice", "s3://other/photos/alice/1.png")
    assert policy.allows("alice", "/data/alice/x.png") and not policy.allows("alice", "/data/alice/../bob/x.png")
    assert not policy.allows("bob", "s3://bucket/photos/alice/1.png")
    assert policy.allows_negative("s3://bucket/pool/n1.png") and not policy.allows_negative("/data/alice/x.png")
    with pytest.raises(PolicyError, match="owner='bob'"):
        policy.check("bob", "s3://bucket/photos/alice/1.png", "subject bob/x")
