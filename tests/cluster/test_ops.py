"""Ops commands against a local Ray (with a one-deployment Serve app) and a store."""

import json
import time

import pytest

from cluster import ops
from cluster.keys import job_prefix, subject_record_key
from cluster.store import open_store
from tests.conftest import random_rows
from yollava.artifacts import ConceptArtifact

APP, DEPLOYMENT = "ops-probe", "Constant"


@pytest.fixture(scope="module")
def serve_app(ray_local):
    """One deployment, one replica holding one of the local Ray's 2 CPUs; no HTTP proxy."""
    from ray import serve

    @serve.deployment(name=DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 1})
    class Constant:
        def __call__(self) -> str:
            return "ok"

    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(Constant.bind(), name=APP, route_prefix=None)
        assert handle.remote().result(timeout_s=60) == "ok"
        yield
    finally:
        serve.shutdown()


def wait_for(check, timeout=30.0):
    """The last value of `check()`, polled until truthy (resource views settle asynchronously)."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def record_jobs(store):
    """A finished job (a summary and one subject record of two) and one still running (a record only)."""
    store.put_json(subject_record_key("job-done", "alice", "bo"), {"owner": "alice", "name": "bo", "status": "trained"})
    store.put_json(f"{job_prefix('job-done')}/summary.json", {"job_id": "job-done", "subjects": [
        {"owner": "alice", "name": "bo", "status": "trained"}, {"owner": "bob", "name": "x", "status": "invalid"}]})
    store.put_json(subject_record_key("job-running", "bob", "bo"), {"owner": "bob", "name": "bo", "status": "trained"})


def test_status_reports_nodes_jobs_and_serve_replicas(serve_app, tmp_path, capsys):
    uri = (tmp_path / "store").as_uri()
    record_jobs(open_store(uri))
    # The replica holds 1 of the 2 CPUs; nothing holds a GPU.
    assert wait_for(lambda: ops.nodes()["cpus_free"] == 1.0), ops.nodes()
    assert ops.main(["status", "--store", uri]) == 0
    st = json.loads(capsys.readouterr().out)
    cluster = st["cluster"]
    assert (cluster["nodes"], cluster["cpus"], cluster["cpus_free"], cluster["gpus_used"]) == (1, 2.0, 1.0, 0.0)
    assert [(n["resources"]["CPU"]) for n in cluster["per_node"]] == [2.0]
    assert st["serve"] == [{"application": APP, "deployment": DEPLOYMENT, "status": "DeploymentStatus.HEALTHY",
                            "replicas": {"RUNNING": 1}}]
    # The tests' Ray has no dashboard: the Jobs API says so, and the store's records still show.
    assert st["jobs"] == [
        {"job": "-", "status": "jobs API unavailable: ConnectionError"},
        {"job": "job-done", "status": "finished", "subjects_recorded": 1, "subjects": 2},
        {"job": "job-running", "status": "recorded", "subjects_recorded": 1},
    ]


def test_a_bug_in_the_jobs_or_serve_query_is_not_reported_as_unavailable(ray_local, monkeypatch):
    from ray import serve

    def broken(*args, **kwargs):
        raise TypeError("a bug, not an unreachable service")

    monkeypatch.setattr(ops, "JobSubmissionClient", broken)
    with pytest.raises(TypeError, match="a bug"):
        ops.jobs(None)
    monkeypatch.setattr(serve, "status", broken)
    with pytest.raises(TypeError, match="a bug"):
        ops.serve_status()


def test_an_unreachable_serve_controller_is_reported(ray_local, monkeypatch):
    from ray import serve
    from ray.serve.exceptions import RayServeException

    def gone():
        raise RayServeException("There is no Serve instance running on this Ray cluster.")

    monkeypatch.setattr(serve, "status", gone)
    assert ops.serve_status() == [{"application": "-", "status": "Serve not running (RayServeException)"}]


def test_scale_requests_and_releases(ray_local):
    assert ops.scale(gpus=2, cpus_per_gpu=3) == [{"GPU": 1, "CPU": 3}] * 2
    assert ops.resource_request() == [{"GPU": 1, "CPU": 3}] * 2
    ops.scale(None, release=True)
    assert ops.resource_request() == []
    with pytest.raises(ValueError, match="--gpus=0"):
        ops.scale(0)


def test_concepts_ls_and_rm(tmp_path, tiny, capsys):
    uri = f"file://{tmp_path}"
    store = open_store(uri)
    for owner, name in [("alice", "bo"), ("alice", "mam"), ("bob", "cat")]:
        store.put_concept(ConceptArtifact(owner, random_rows(tiny, name, k=2), "tiny", tiny.fingerprint))
    assert ops.main(["concepts", "ls", "--owner", "alice", "--store", uri]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["owner"], c["name"]) for c in listed] == [("alice", "bo"), ("alice", "mam")]
    assert ops.main(["concepts", "rm", "alice/bo", "--store", uri]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == [1]
    assert [c.name for c in store.list_concepts("alice")] == ["mam"]
    assert ops.main(["concepts", "rm", "alice/bo", "--store", uri]) == 2
    assert ops.main(["concepts", "rm", "../x", "--store", uri]) == 2
