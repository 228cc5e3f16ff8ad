"""The artifact store: same behaviour on a local folder and on S3 (moto or CI's server)."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cluster.store import MiB, ConceptExists, ConceptNotFound, ConceptRef, FileStore, ObjectNotFound, open_store
from cluster.store_s3 import S3Store
from tests.cluster.conftest import MULTIPART
from tests.conftest import random_rows
from yollava.artifacts import MANIFEST_FILE, TENSORS_FILE, ArtifactError, ConceptArtifact

ROOT = Path(__file__).resolve().parents[2]
OBJECT_LAYER = ("put_bytes", "get_bytes", "exists", "list_prefix", "delete_prefix", "delete_key")


def make_artifact(backbone, owner="alice", name="bo", seed=0):
    return ConceptArtifact(owner, random_rows(backbone, name, seed=seed), "tiny", backbone.fingerprint)


def version_key(owner, name, version, file):
    return f"concepts/{owner}/{name}/v{version}/{file}"


def assert_same_rows(got, want):
    assert torch.equal(got.rows.embed, want.rows.embed)
    assert torch.equal(got.rows.head, want.rows.head)


# -- concepts ---------------------------------------------------------------------------


def test_round_trip_gives_identical_tensors(store, tiny):
    art = make_artifact(tiny)
    assert store.put_concept(art) == 1
    got = store.get_concept("alice", "bo", expect_fingerprint=tiny.fingerprint)
    assert_same_rows(got, art)
    assert (got.owner, got.name, got.version, got.base_fingerprint) == ("alice", "bo", 1, tiny.fingerprint)
    with pytest.raises(ArtifactError, match="fingerprint"):
        store.get_concept("alice", "bo", expect_fingerprint="another-base")


def test_versions_increment_and_explicit_version_must_be_free(store, tiny):
    arts = [make_artifact(tiny, seed=s) for s in range(3)]
    assert [store.put_concept(a) for a in arts] == [1, 2, 3]
    assert store.versions("alice", "bo") == [1, 2, 3]
    assert store.latest_version("alice", "bo") == 3
    assert_same_rows(store.get_concept("alice", "bo"), arts[2])
    assert_same_rows(store.get_concept("alice", "bo", version=1), arts[0])
    assert store.put_concept(arts[0], version=7) == 7
    assert store.get_concept("alice", "bo").version == 7
    assert store.put_concept(arts[0]) == 8
    with pytest.raises(ConceptExists, match="alice/bo version 2"):
        store.put_concept(arts[0], version=2)


def test_version_without_manifest_is_invisible_and_overwritten(store, tiny):
    first, orphan, second = (make_artifact(tiny, seed=s) for s in range(3))
    store.put_concept(first)
    tensors, _ = orphan.to_bytes()
    store.put_bytes(version_key("alice", "bo", 2, TENSORS_FILE), tensors)  # a writer killed mid-put
    assert store.versions("alice", "bo") == [1]
    assert store.list_concepts() == [ConceptRef("alice", "bo", 1)]
    assert_same_rows(store.get_concept("alice", "bo"), first)
    with pytest.raises(ConceptNotFound):
        store.get_concept("alice", "bo", version=2)
    assert store.put_concept(second) == 2
    assert_same_rows(store.get_concept("alice", "bo"), second)


def test_missing_concept_raises_concept_not_found(store, tiny):
    with pytest.raises(ConceptNotFound, match="alice/bo: any version") as e:
        store.get_concept("alice", "bo")
    assert isinstance(e.value, KeyError) and (e.value.owner, e.value.name) == ("alice", "bo")
    assert store.latest_version("alice", "bo") is None
    store.put_concept(make_artifact(tiny))
    with pytest.raises(ConceptNotFound, match="alice/bo: version 5"):
        store.get_concept("alice", "bo", version=5)


def test_tampered_tensors_are_refused(store, tiny):
    store.put_concept(make_artifact(tiny))
    key = version_key("alice", "bo", 1, TENSORS_FILE)
    tensors = st_load(store.get_bytes(key))
    tensors["embed"][0, 0] += 1.0
    store.put_bytes(key, st_save(tensors))
    with pytest.raises(ArtifactError, match="sha256"):
        store.get_concept("alice", "bo")
    store.put_bytes(key, b"not a safetensors file")
    with pytest.raises(ArtifactError, match="unreadable"):
        store.get_concept("alice", "bo")


def test_concept_copied_under_another_owner_is_refused(store, tiny):
    store.put_concept(make_artifact(tiny))
    for file in (TENSORS_FILE, MANIFEST_FILE):
        store.put_bytes(version_key("mallory", "bo", 1, file), store.get_bytes(version_key("alice", "bo", 1, file)))
    with pytest.raises(ArtifactError, match="stored as mallory/bo version 1 says it is alice/bo"):
        store.get_concept("mallory", "bo")


def test_list_concepts_by_owner(store, tiny):
    for owner, name in [("alice", "bo"), ("alice", "bo"), ("alice", "cat"), ("bob", "bo"), ("bobby", "dog")]:
        store.put_concept(make_artifact(tiny, owner, name))
    assert store.list_concepts("alice") == [ConceptRef("alice", "bo", 2), ConceptRef("alice", "cat", 1)]
    assert store.list_concepts("bob") == [ConceptRef("bob", "bo", 1)]  # not bobby's
    assert [(r.owner, r.name) for r in store.list_concepts()] == [
        ("alice", "bo"), ("alice", "cat"), ("bob", "bo"), ("bobby", "dog")]
    assert store.list_concepts("carol") == []


def test_delete_one_version_or_all(store, tiny):
    for _ in range(3):
        store.put_concept(make_artifact(tiny))
    store.put_concept(make_artifact(tiny, name="bob"))
    assert store.delete_concept("alice", "bo", version=2) == [2]
    assert store.versions("alice", "bo") == [1, 3]
    assert store.delete_concept("alice", "bo") == [1, 3]
    assert store.versions("alice", "bo") == []
    assert store.list_prefix("concepts/alice/bo") == []
    assert store.list_concepts() == [ConceptRef("alice", "bob", 1)]  # a name sharing the prefix survives
    assert store.delete_concept("alice", "bo") == []


@pytest.mark.parametrize("bad", ["../x", "A", ""])
def test_bad_owner_or_name_is_rejected_before_any_key_is_built(store, tiny, monkeypatch, bad):
    def no_object_access(*args, **kwargs):
        raise AssertionError(f"object layer reached with {args}")

    for method in OBJECT_LAYER:
        monkeypatch.setattr(store, method, no_object_access)
    calls = {
        "owner": [lambda: store.put_concept(make_artifact(tiny, owner=bad)), lambda: store.list_concepts(bad)],
        "name": [],
    }
    for field, (owner, name) in {"owner": (bad, "bo"), "name": ("alice", bad)}.items():
        calls[field] += [lambda o=owner, n=name: store.get_concept(o, n),
                         lambda o=owner, n=name: store.get_concept(o, n, version=1),
                         lambda o=owner, n=name: store.versions(o, n),
                         lambda o=owner, n=name: store.delete_concept(o, n)]
        for call in calls[field]:
            with pytest.raises(ValueError, match=re.escape(f"{field}={bad!r}")):
                call()


# -- objects ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/etc/passwd", "a//b", "a/", "a\\b", "",
                                 "a/./b", "a/.hidden", "a\nb"])
def test_bad_keys_are_rejected(store, key):
    for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.exists(key),
                 lambda: store.put_json(key, {})):
        with pytest.raises(ValueError, match=re.escape(f"key={key!r}")):
            call()


def test_file_store_keys_never_leave_the_root(tmp_path):
    store = open_store((tmp_path / "root").as_uri())
    for key in ("../escape", "a/../../escape"):
        with pytest.raises(ValueError, match="not a valid store key"):
            store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="delete the whole store"):
        store.delete_prefix("")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_objects_json_and_folder_prefixes(store):
    store.put_json("jobs/a/summary.json", {"done": ["bo"], "failed": {}})
    store.put_bytes("jobs/ab/marker", b"")
    store.put_bytes("jobs/a/deep/x.bin", b"\x00\x01")
    assert store.get_json("jobs/a/summary.json") == {"done": ["bo"], "failed": {}}
    assert store.exists("jobs/ab/marker") and not store.exists("jobs/a/marker")
    assert store.list_prefix("jobs/a") == ["jobs/a/deep/x.bin", "jobs/a/summary.json"]  # not jobs/ab
    assert store.list_prefix() == ["jobs/a/deep/x.bin", "jobs/a/summary.json", "jobs/ab/marker"]
    assert store.delete_prefix("jobs/a/") == 2
    assert store.list_prefix() == ["jobs/ab/marker"]
    with pytest.raises(ObjectNotFound, match="jobs/a/summary.json"):
        store.get_json("jobs/a/summary.json")


def test_large_file_round_trips(store, tmp_path):
    blob = os.urandom(6 * MiB)
    (tmp_path / "index.faiss").write_bytes(blob)
    store.put_file("indexes/pool.faiss", tmp_path / "index.faiss")
    out = store.get_file("indexes/pool.faiss", tmp_path / "out" / "pool.faiss")
    assert out.read_bytes() == blob
    assert not [p for p in out.parent.iterdir() if p.name != "pool.faiss"]  # no temp file left
    with pytest.raises(ObjectNotFound, match="indexes/missing"):
        store.get_file("indexes/missing", tmp_path / "out" / "missing")
    assert not (tmp_path / "out" / "missing").exists()


def test_large_objects_go_up_in_parts_on_s3(s3_endpoint, s3_bucket, s3_client, tmp_path):
    store = open_store(f"s3://{s3_bucket}/root", endpoint_url=s3_endpoint, **MULTIPART)
    blob = os.urandom(6 * MiB)
    (tmp_path / "big.bin").write_bytes(blob)
    store.put_bytes("blobs/big-bytes", blob)
    store.put_file("blobs/big-file", tmp_path / "big.bin")
    for key in ("blobs/big-bytes", "blobs/big-file"):
        assert store.get_bytes(key) == blob
        etag = s3_client.head_object(Bucket=s3_bucket, Key=f"root/{key}")["ETag"]
        assert etag.endswith('-2"'), f"{key} was not a two-part upload: ETag {etag}"


# -- opening, repr, pickling ----------------------------------------------------------------


def test_open_store_by_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert open_store(str(tmp_path)).root == tmp_path
    assert open_store(tmp_path.as_uri()).root == tmp_path
    s3 = open_store("s3://my-bucket/team/prefix/", endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix, s3.uri) == (
        "my-bucket", "team/prefix", "s3://my-bucket/team/prefix")


@pytest.mark.parametrize(("uri", "options", "named"), [
    ("gs://bucket/x", {}, "'gs://bucket/x'"),
    ("http://host/x", {}, "'http://host/x'"),
    ("file://host/x", {}, "'file://host/x'"),
    ("", {}, "uri=''"),
    ("s3://Bad_Bucket/x", {}, "bucket='Bad_Bucket'"),
    ("s3://my-bucket/../x", {}, "key='../x'"),
    ("s3://my-bucket/x", {"retry_mode": "eager"}, "retry_mode='eager'"),
    ("/tmp/store", {"endpoint_url": "http://127.0.0.1:9"}, "['endpoint_url']"),
])
def test_open_store_refuses_bad_uris_and_options(monkeypatch, uri, options, named):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(ValueError, match=re.escape(named)):
        open_store(uri, **options)


def test_repr_has_no_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_store("s3://bucket/p", endpoint_url="http://user:pass-secret@127.0.0.1:9000", retry_mode="adaptive")
    shown = f"{store!r} {store}"
    assert "s3://bucket/p" in shown and "127.0.0.1:9000" in shown
    for secret in ("AKIDSECRETID", "very-secret-key", "pass-secret"):
        assert secret not in shown
    with pytest.raises(ValueError) as e:
        open_store("s3://AKIDSECRETID:very-secret-key@bucket/p")
    assert "very-secret-key" not in str(e.value) and "AKIDSECRETID" not in str(e.value)
    assert repr(open_store(tmp_path.as_uri())) == f"FileStore({tmp_path.as_uri()!r})"


def test_endpoint_read_from_environment_like_boto3(s3_endpoint, s3_bucket, monkeypatch, tiny):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    store = open_store(f"s3://{s3_bucket}/env")
    assert store.put_concept(make_artifact(tiny)) == 1
    assert store.list_concepts() == [ConceptRef("alice", "bo", 1)]


def test_store_survives_pickling_for_ray_tasks(store, tiny):
    store.put_concept(make_artifact(tiny))
    copy = pickle.loads(pickle.dumps(store))
    assert type(copy) in (FileStore, S3Store) and copy.uri == store.uri
    assert_same_rows(copy.get_concept("alice", "bo"), make_artifact(tiny))
    assert copy.put_concept(make_artifact(tiny)) == 2  # writes too (multipart config rebuilt)
    assert store.versions("alice", "bo") == [1, 2]


# What a process that only uses a local store has loaded of the store and of boto3/botocore.
FILE_ONLY = """
import json, sys
from cluster.store import access_errors, open_store

store = open_store(sys.argv[1])
store.put_json("jobs/j/summary.json", {"ok": True})
assert store.get_json("jobs/j/summary.json") == {"ok": True}
assert store.list_prefix("jobs") == ["jobs/j/summary.json"] and store.exists("jobs/j/summary.json")
print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "cluster")),
                  "access_errors": [e.__name__ for e in access_errors()]}))
"""


def test_a_file_store_never_imports_boto3(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", FILE_ONLY, (tmp_path / "store").as_uri()], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"modules": ["cluster", "cluster.store", "cluster.store_base"],
                                       "access_errors": []}


def test_s3_access_errors_are_known_once_the_backend_is_loaded(monkeypatch):
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from cluster.store import access_errors

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    open_store("s3://my-bucket/x", endpoint_url="http://127.0.0.1:9")
    assert access_errors() == (BotoCoreError, ClientError)
    assert not issubclass(ObjectNotFound, access_errors()) and issubclass(NoCredentialsError, access_errors())


# -- racing writers (issue 15, finding 1) ----------------------------------------------------------


def test_racing_writers_each_get_their_own_complete_version(store):
    """Three writers of one concept at once, a reader loading the latest meanwhile, many rounds:
    no version is returned twice, every version loads and holds its own writer's tensors."""
    from bench.reliability import race_writers

    rounds = 8 if store.uri.startswith("file:") else 5  # S3 rounds cost more (python -m bench.reliability: 50)
    result = race_writers(store, rounds=rounds, writers=3)
    assert result["rounds"] == rounds and result["reads"] > 0
    assert result["violations"] == []


def test_put_if_absent_writes_once(store):
    assert store.put_if_absent("locks/a", b"first")
    assert not store.put_if_absent("locks/a", b"second")
    assert store.get_bytes("locks/a") == b"first"
    assert store.list_prefix("locks") == ["locks/a"]  # no temp file left behind
    with pytest.raises(ValueError, match=re.escape("key='../x'")):
        store.put_if_absent("../x", b"")


def test_a_version_claimed_by_a_killed_writer_is_never_reused(store, tiny):
    first, second = make_artifact(tiny, seed=1), make_artifact(tiny, seed=2)
    store.put_concept(first)
    # A writer claimed version 2, wrote its tensors and died before its manifest.
    store.put_bytes("concepts/alice/bo/v2/claims/dead-writer", b"{}")
    store.put_bytes(version_key("alice", "bo", 2, TENSORS_FILE), second.to_bytes()[0])
    assert store.versions("alice", "bo") == [1]
    assert store.put_concept(second) == 3
    assert_same_rows(store.get_concept("alice", "bo"), second)
    with pytest.raises(ConceptExists, match="alice/bo version 2"):
        store.put_concept(first, version=2)
    assert store.versions("alice", "bo") == [1, 3]


def test_a_manifest_write_retried_after_it_landed_is_the_writers_own(store, tiny, monkeypatch):
    """S3 answered 5xx to a write that had landed; the retry finds the object there: that is ours."""
    real = store.put_if_absent

    def landed_then_failed(key, data):
        assert real(key, data)
        return real(key, data)  # the retry: the key exists now

    monkeypatch.setattr(store, "put_if_absent", landed_then_failed)
    assert store.put_concept(make_artifact(tiny)) == 1
    assert_same_rows(store.get_concept("alice", "bo"), make_artifact(tiny))


def test_deleting_the_last_version_ends_the_concept(store, tiny):
    store.put_concept(make_artifact(tiny))
    first = store.incarnation("alice", "bo", create=True)
    assert store.incarnation("alice", "bo") == first
    store.put_concept(make_artifact(tiny, seed=1))
    assert store.delete_concept("alice", "bo", version=1) == [1]
    assert store.incarnation("alice", "bo") == first  # version 2 lives on: the same concept
    assert store.delete_concept("alice", "bo", version=2) == [2]
    assert store.list_prefix("concepts/alice/bo") == [] and store.incarnation("alice", "bo") is None
    with pytest.raises(ConceptNotFound):
        store.incarnation("alice", "bo", create=True)
    store.put_concept(make_artifact(tiny))
    assert store.incarnation("alice", "bo", create=True) not in (None, first)


def test_a_store_behind_a_proxy_answering_503_loses_nothing(s3_endpoint, s3_bucket, tiny, tmp_path):
    """Every 5th request answered 503 SlowDown (never reaching the server): racing writers, claims,
    conditional manifests and reads all go through, and a whole job completes (bench.reliability;
    botocore's retries back off up to a second, hence few rounds)."""
    from bench.faults import FaultyS3Proxy
    from bench.reliability import fault_run, job_ok, race_writers

    with FaultyS3Proxy(s3_endpoint, every=5) as proxy:
        store = open_store(f"s3://{s3_bucket}/faulty", endpoint_url=proxy.url)
        result = race_writers(store, rounds=2, writers=2)
    assert proxy.failed >= 3 and result["violations"] == []
    row = fault_run(tmp_path, s3_endpoint, every=5, local=True)
    assert row["answered_503"] >= 5 and job_ok(row), row
