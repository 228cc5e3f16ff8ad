"""Deleting a concept deletes what it left behind; a done-marker never outlives its version (issue 15, 3)."""

import json

from cluster import ops
from cluster.keys import subject_record_key
from cluster.lifecycle import forget_concept
from cluster.personalize import main
from cluster.store import open_store
from serve.concepts import Sharing
from tests.cluster.helpers import SUBJECTS, write_request
from yollava.mining import image_sha256


def submit(path, capsys, *extra):
    code = main([str(path), "--local", "--no-progress", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1])


def photo_hashes(root, owner, name):
    return {image_sha256(p.read_bytes()) for p in (root / "photos" / owner / name).iterdir()}


def everything(store) -> bytes:
    return b"\n".join(k.encode() + b"\n" + store.get_bytes(k) for k in store.list_prefix())


def test_a_marker_whose_version_is_gone_never_skips_training(tmp_path, capsys):
    store_dir = tmp_path / "store"
    path = write_request(tmp_path, str(store_dir), subjects=SUBJECTS[:2], pool=0)
    assert submit(path, capsys)[1]["counts"] == {"trained": 2}
    store = open_store(str(store_dir))
    assert store.delete_concept("alice", "bo") == [1]  # the version only (a bug, a hand): the marker stays
    assert store.list_prefix("done/alice/bo")
    code, summary = submit(path, capsys)
    assert (code, summary["counts"]) == (0, {"trained": 1, "done-before": 1})
    assert store.latest_version("alice", "bo") is not None
    store.get_concept("alice", "bo")  # loads


def test_delete_removes_versions_markers_records_and_grants_and_retraining_trains(tmp_path, capsys):
    store_dir = tmp_path / "store"
    path = write_request(tmp_path, str(store_dir), pool=3)
    code, first = submit(path, capsys, "--job-id", "job-one")
    assert (code, first["counts"]) == (0, {"trained": 3})
    store = open_store(str(store_dir))
    Sharing(store).share("alice", "bo", "bob")
    secret = photo_hashes(tmp_path, "alice", "bo")
    assert any(h.encode() in everything(store) for h in secret)  # the job record lists them

    report = forget_concept(store, "alice", "bo")
    assert report["versions"] == [1] and report["markers"] == 1 and report["records"] == 1
    assert store.versions("alice", "bo") == [] and store.list_prefix("concepts/alice/bo") == []
    assert store.list_prefix("done/alice/bo") == []
    assert not store.exists(subject_record_key("job-one", "alice", "bo"))
    assert Sharing(store).grantees("alice", "bo") == [] and Sharing(store).shared_with("bob") == []
    text = everything(store)
    assert not any(h.encode() in text for h in secret), "a photo hash of the deleted concept is still stored"
    row = next(r for r in store.get_json("jobs/job-one/summary.json")["subjects"] if r["name"] == "bo"
               and r["owner"] == "alice")
    assert row == {"owner": "alice", "name": "bo", "status": "deleted"}
    # the others are untouched
    assert store.exists(subject_record_key("job-one", "alice", "mug")) and store.list_prefix("done/bob/bo")
    assert store.versions("bob", "bo") == [1]

    code, again = submit(path, capsys)
    assert (code, again["counts"]) == (0, {"trained": 1, "done-before": 2})
    assert store.versions("alice", "bo") == [1] and not Sharing(store).grantees("alice", "bo")


def test_ops_rm_of_a_whole_concept_forgets_it_too(tmp_path, capsys):
    store_dir = tmp_path / "store"
    path = write_request(tmp_path, str(store_dir), subjects=SUBJECTS[:1], pool=0)
    assert submit(path, capsys, "--job-id", "job-rm")[1]["counts"] == {"trained": 1}
    uri = open_store(str(store_dir)).uri
    assert ops.main(["concepts", "rm", "alice/bo", "--store", uri]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == [1]
    store = open_store(uri)
    assert store.list_prefix("done") == [] and not store.exists(subject_record_key("job-rm", "alice", "bo"))
    assert submit(path, capsys)[1]["counts"] == {"trained": 1}
