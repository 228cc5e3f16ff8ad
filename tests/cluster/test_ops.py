"""Ops commands against a local Ray and a store."""

import json

import pytest
import ray

from cluster import ops
from tests.conftest import random_rows
from yollava.artifacts import ConceptArtifact


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_status_reports_nodes_and_gpus(local_ray):
    st = ops.status(store=None)
    assert st["cluster"]["nodes"] >= 1
    assert st["cluster"]["cpus"] >= 1
    assert st["cluster"]["gpus_used"] == st["cluster"]["gpus"] - st["cluster"]["gpus_free"]
    assert isinstance(st["serve"], list) and isinstance(st["jobs"], list)


def test_scale_requests_and_releases(local_ray):
    assert ops.scale(gpus=2, cpus_per_gpu=3) == [{"GPU": 1, "CPU": 3}] * 2
    assert ops.resource_request() == [{"GPU": 1, "CPU": 3}] * 2
    ops.scale(None, release=True)
    assert ops.resource_request() == []
    with pytest.raises(ValueError, match="--gpus=0"):
        ops.scale(0)


def test_concepts_ls_and_rm(tmp_path, tiny, capsys):
    from cluster.store import open_store

    uri = f"file://{tmp_path}"
    store = open_store(uri)
    for owner, name in [("alice", "bo"), ("alice", "mam"), ("bob", "cat")]:
        store.put_concept(ConceptArtifact(owner, random_rows(tiny, name, k=2), "tiny", tiny.fingerprint))
    assert ops.main(["concepts", "ls", "--owner", "alice", "--store", uri]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["owner"], c["name"]) for c in listed] == [("alice", "bo"), ("alice", "mam")]
    assert ops.main(["concepts", "rm", "alice/bo", "--store", uri]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": [1]}
    assert [c.name for c in store.list_concepts("alice")] == ["mam"]
    assert ops.main(["concepts", "rm", "alice/bo", "--store", uri]) == 2
    assert ops.main(["concepts", "rm", "../x", "--store", uri]) == 2
