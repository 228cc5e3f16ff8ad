"""The upload queue (cluster/queue.py): batches of many tenants, restarts, dead jobs, exactly once.

The dispatcher talks to a fake job API that runs the real `cluster.personalize`
entry point in this process (`--local`, the tiny model) when a test says so, and
can lose submissions or have jobs die; the store is real (file:// and s3://).
A dispatcher "restarts" by being made anew on the same store: it keeps nothing else.
"""

import io
import shlex

import pytest

from cluster.personalize import main as personalize
from cluster.queue import (FAILED, QUEUED, READY, TRAINING, Dispatcher, JobApiError, QueueConfig, commit_upload,
                           pending_key, tenant_uploads, unfinished_uploads, upload_prefix, upload_state)
from tests.cluster.helpers import TINY_RECIPE
from tests.conftest import random_photo


def photos(seed, n=3):
    out = []
    for i in range(n):
        buf = io.BytesIO()
        random_photo(seed * 10 + i).save(buf, format="PNG")
        out.append((buf.getvalue(), {"sha256": f"{seed}-{i}", "width": 40, "height": 40}))
    return out


class FakeJobs:
    """Ray's job API as the dispatcher sees it; jobs run when the test calls `run`."""

    def __init__(self):
        self.submitted: list[str] = []
        self.entry: dict[str, str] = {}
        self.state: dict[str, tuple[str, str]] = {}
        self.lose_next = 0  # submissions that fail before reaching Ray

    def submit(self, submission_id, entrypoint, runtime_env, metadata, num_cpus):
        if self.lose_next:
            self.lose_next -= 1
            raise JobApiError("connection refused")
        assert submission_id not in self.state, f"{submission_id} submitted twice"  # Ray refuses it too
        self.submitted.append(submission_id)
        self.entry[submission_id] = entrypoint
        self.state[submission_id] = ("PENDING", "")

    def status(self, submission_id):
        return self.state.get(submission_id)

    def run(self, submission_id, die_before_summary=False):
        argv = shlex.split(self.entry[submission_id])
        assert argv[1:3] == ["-m", "cluster.personalize"]
        rc = personalize(argv[3:] + ["--local"])
        if die_before_summary:  # the driver is killed after training, before its summary
            store_key = f"jobs/{submission_id}/summary.json"
            self.store.delete_key(store_key)
            self.state[submission_id] = ("FAILED", "Job entrypoint command failed: bob/secret went wrong")
        else:
            self.state[submission_id] = ("SUCCEEDED" if rc == 0 else "FAILED", f"exit {rc}")
        return rc

    def run_all(self, **kw):
        for job in list(self.submitted):
            if self.state[job][0] == "PENDING":
                self.run(job, **kw)


def config(**kw):
    return QueueConfig(base_model="tiny", recipe=TINY_RECIPE, poll_s=0.1, **{"min_batch": 2, "max_wait_s": 3600, **kw})


@pytest.fixture
def jobs(store):
    j = FakeJobs()
    j.store = store
    return j


def versions(store, *concepts):
    return {f"{o}/{n}": store.versions(o, n) for o, n in concepts}


def test_uploads_of_two_tenants_are_one_job_and_end_ready(store, jobs, monkeypatch, s3_endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)  # where the job reads s3:// photos
    a = commit_upload(store, "alice", "bo", "my dog", photos(1))
    assert upload_state(store, "alice", "bo", a.id)["status"] == QUEUED
    d = Dispatcher(store, jobs, config(min_batch=2))
    assert d.tick().submitted == []  # one waits: not enough for a job, and not waited long
    b = commit_upload(store, "bob", "bo", None, photos(2))
    report = d.tick()
    assert len(report.submitted) == 1 and jobs.submitted == report.submitted
    job = jobs.submitted[0]
    request = store.get_json(f"queue/batches/{job.rsplit('-a', 1)[0]}/request.json")
    assert sorted((s["owner"], s["name"]) for s in request["subjects"]) == [("alice", "bo"), ("bob", "bo")]
    assert upload_state(store, "alice", "bo", a.id)["status"] == TRAINING
    jobs.run_all()
    report = d.tick()
    assert sorted(report.finished) == sorted([a.id, b.id])
    for (t, upload) in (("alice", a), ("bob", b)):
        state = upload_state(store, t, "bo", upload.id)
        assert state["status"] == READY and state["version"] == 1 and state["job_id"] == job
        assert store.list_prefix(f"{upload_prefix(t, 'bo', upload.id)}/photos") == []  # photos go once trained
    assert versions(store, ("alice", "bo"), ("bob", "bo")) == {"alice/bo": [1], "bob/bo": [1]}
    assert store.list_prefix("queue/pending") == []
    assert d.tick().submitted == [] and len(jobs.submitted) == 1


def test_a_lone_upload_is_submitted_after_max_wait(tmp_path, jobs):
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    jobs.store = store
    now = [1e9]
    commit_upload(store, "alice", "bo", None, photos(1))
    d = Dispatcher(store, jobs, config(min_batch=5, max_wait_s=30), clock=lambda: now[0])
    store.put_json(pending_key(unfinished_uploads(store, "alice")["bo"]),
                   {"tenant": "alice", "name": "bo", "created": now[0]})
    assert d.tick().submitted == []
    now[0] += 31
    assert len(d.tick().submitted) == 1


def test_a_restarted_dispatcher_follows_the_job_and_nothing_is_trained_twice(store, jobs, monkeypatch, s3_endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    a = commit_upload(store, "alice", "bo", None, photos(1))
    jobs.lose_next = 1  # the first submission never reaches Ray (the service died, or the API was down)
    first = Dispatcher(store, jobs, config(min_batch=1))
    report = first.tick()
    assert report.submitted == [] and report.errors
    assert upload_state(store, "alice", "bo", a.id)["status"] == TRAINING  # claimed, attempt recorded
    second = Dispatcher(store, jobs, config(min_batch=1))  # the service restarts
    assert len(second.tick().submitted) == 1  # the same attempt, submitted again
    third = Dispatcher(store, jobs, config(min_batch=1))  # ... and restarts again while the job runs
    assert third.tick().submitted == []
    b = commit_upload(store, "carol", "mug", None, photos(3))  # queued meanwhile: its own batch
    jobs.run_all()
    fourth = Dispatcher(store, jobs, config(min_batch=1, max_active_jobs=1))
    report = fourth.tick()
    assert a.id in report.finished and len(report.submitted) == 1
    jobs.run_all()
    assert b.id in fourth.tick().finished
    assert len(jobs.submitted) == 2 and all(j.endswith("-a1") for j in jobs.submitted)
    assert versions(store, ("alice", "bo"), ("carol", "mug")) == {"alice/bo": [1], "carol/mug": [1]}


def test_a_dispatcher_dying_between_batch_and_claims_loses_nothing(tmp_path, jobs, monkeypatch):
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    jobs.store = store
    a = commit_upload(store, "alice", "bo", None, photos(1))
    real = store.put_if_absent

    def dies_at_claim(key, data):
        if key.endswith("/claim.json"):
            raise SystemExit("killed")  # the process dies here
        return real(key, data)

    monkeypatch.setattr(store, "put_if_absent", dies_at_claim)
    with pytest.raises(SystemExit):
        Dispatcher(store, jobs, config(min_batch=1)).tick()
    monkeypatch.setattr(store, "put_if_absent", real)
    assert upload_state(store, "alice", "bo", a.id)["status"] == QUEUED  # its batch never claimed it
    d = Dispatcher(store, jobs, config(min_batch=1))
    assert len(d.tick().submitted) == 1
    jobs.run_all()
    assert d.tick().finished == [a.id]
    assert store.versions("alice", "bo") == [1]


def test_a_job_that_dies_without_a_summary_is_retried_and_trains_nothing_twice(store, jobs, monkeypatch,
                                                                                s3_endpoint, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    a = commit_upload(store, "alice", "bo", None, photos(1))
    d = Dispatcher(store, jobs, config(min_batch=1))
    d.tick()
    jobs.run_all(die_before_summary=True)  # trained and marked, then the driver died
    report = d.tick()
    assert report.finished == [] and report.submitted == [jobs.submitted[0].replace("-a1", "-a2")]
    jobs.run_all()
    assert d.tick().finished == [a.id]
    state = upload_state(store, "alice", "bo", a.id)
    assert state["status"] == READY and state["version"] == 1
    summary = store.get_json(f"jobs/{jobs.submitted[1]}/summary.json")
    assert [r["status"] for r in summary["subjects"]] == ["done-before"]  # found done, not trained again
    assert store.versions("alice", "bo") == [1]


def test_a_batch_whose_jobs_keep_dying_fails_with_a_reason_of_its_own(tmp_path, jobs):
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    jobs.store = store
    a = commit_upload(store, "alice", "bo", None, photos(1))
    d = Dispatcher(store, jobs, config(min_batch=1, max_attempts=2))
    d.tick()
    for job in ("-a1", "-a2"):
        assert jobs.submitted[-1].endswith(job)
        jobs.state[jobs.submitted[-1]] = ("FAILED", "Job entrypoint command failed: bob/secret went wrong")
        d.tick()
    state = upload_state(store, "alice", "bo", a.id)
    assert state["status"] == FAILED and "2 attempt(s)" in state["reason"]
    assert "bob" not in state["reason"]  # Ray's message (the job's log, any tenant's) is not shown
    assert unfinished_uploads(store, "alice") == {} and store.list_prefix("queue/pending") == []
    assert len(jobs.submitted) == 2


def test_uncommitted_and_deleted_uploads_leave_the_queue(tmp_path, jobs):
    from cluster.queue import discard_upload
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    now = [1e9]
    # a writer that died after its marker and one photo, before upload.json
    store.put_json(pending_key("u-20260101000000000000-0000abcd"), {"tenant": "alice", "name": "bo", "created": now[0]})
    store.put_bytes(f"{upload_prefix('alice', 'bo', 'u-20260101000000000000-0000abcd')}/photos/00.png", b"x")
    gone = commit_upload(store, "bob", "cup", None, photos(2))
    discard_upload(store, "bob", "cup", gone.id)  # deleted while queued
    d = Dispatcher(store, jobs, config(min_batch=1, abandon_s=60), clock=lambda: now[0])
    assert d.tick().submitted == []
    now[0] += 61
    assert d.tick().removed == ["u-20260101000000000000-0000abcd"]
    assert store.list_prefix("uploads") == [] and store.list_prefix("queue/pending") == []
    assert tenant_uploads(store, "alice") == {} and jobs.submitted == []


def test_ids_and_names_from_outside_never_become_paths(tmp_path):
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    for bad in ("../x", "a/b", "Bo", ""):
        with pytest.raises(ValueError):
            commit_upload(store, "alice", bad, None, photos(1))
        with pytest.raises(ValueError):
            upload_prefix(bad, "bo", "u-20260101000000000000-0000abcd")
    for bad in ("../u", "u-1", "u-20260101000000000000-0000abcd/../x"):
        with pytest.raises(ValueError):
            upload_prefix("alice", "bo", bad)
    assert store.list_prefix() == []


def test_forgetting_a_concept_forgets_its_uploads_and_their_queue_entries(tmp_path):
    from cluster.lifecycle import forget_concept
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    a = commit_upload(store, "alice", "bo", None, photos(1))
    other = commit_upload(store, "alice", "mug", None, photos(2))
    report = forget_concept(store, "alice", "bo")
    assert report["uploads"] == 1
    assert store.list_prefix("uploads/alice/bo") == [] and not store.exists(pending_key(a.id))
    assert unfinished_uploads(store, "alice") == {"mug": other.id} and store.exists(pending_key(other.id))


def test_a_concept_in_training_cannot_be_forgotten_and_nothing_of_it_goes(tmp_path, jobs):
    """Deleting while a batch has the upload would orphan the batch and let its job bring the concept
    back; it is refused (ConceptBusy), deleting nothing, and the job ends as usual."""
    from cluster.lifecycle import forget_concept
    from cluster.queue import ConceptBusy
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    jobs.store = store
    up = commit_upload(store, "alice", "bo", None, photos(1))
    d = Dispatcher(store, jobs, config(min_batch=1))
    assert len(d.tick().submitted) == 1  # claimed, request written, submitted
    before = sorted(store.list_prefix("uploads")) + sorted(store.list_prefix("queue/pending"))
    with pytest.raises(ConceptBusy, match="alice/bo is training"):
        forget_concept(store, "alice", "bo")
    assert sorted(store.list_prefix("uploads")) + sorted(store.list_prefix("queue/pending")) == before
    jobs.run_all()
    d.tick()
    assert upload_state(store, "alice", "bo", up.id)["status"] == READY
    forget_concept(store, "alice", "bo")  # once ready it goes, all of it
    assert store.list_prefix("uploads/alice") == [] and store.latest_version("alice", "bo") is None


def test_a_discarded_upload_is_never_claimed_even_mid_delete(tmp_path, jobs):
    """discard_upload claims the upload for no batch before deleting it: a dispatcher looking in the
    middle of a delete (claim written, files not yet gone) cannot take it, and a queued concept's delete
    leaves no job behind."""
    from cluster.lifecycle import forget_concept
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    jobs.store = store
    mid = commit_upload(store, "alice", "bo", None, photos(1))
    store.put_json(f"{upload_prefix('alice', 'bo', mid.id)}/claim.json", {"discarded": True, "at": "now"})
    d = Dispatcher(store, jobs, config(min_batch=1))
    assert d.tick().submitted == [] and jobs.submitted == []
    assert upload_state(store, "alice", "bo", mid.id)["status"] == QUEUED  # (gone in a moment)
    queued = commit_upload(store, "bob", "cup", None, photos(2))
    report = forget_concept(store, "bob", "cup")
    assert report["uploads"] == 1 and not store.exists(pending_key(queued.id))
    assert d.tick().submitted == [] and jobs.submitted == []
    assert store.list_prefix("uploads/bob") == []


def test_a_job_the_api_keeps_refusing_fails_its_batch_after_the_deadline(tmp_path, jobs):
    """A submission refused every time (a 4xx from Ray's job API) used to leave the upload in
    `training` forever, undeletable; after submit_deadline_s its members fail with a reason."""
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    jobs.store = store
    now = [1e9]
    up = commit_upload(store, "alice", "bo", None, photos(1))
    jobs.lose_next = 10**6  # every submission refused
    d = Dispatcher(store, jobs, config(min_batch=1, submit_deadline_s=120), clock=lambda: now[0])
    for _ in range(5):
        report = d.tick()
        assert report.errors and upload_state(store, "alice", "bo", up.id)["status"] == TRAINING
        now[0] += 20
    now[0] += 100
    d.tick()
    state = upload_state(store, "alice", "bo", up.id)
    assert state["status"] == FAILED and "did not accept its job" in state["reason"], state
    assert jobs.submitted == [] and unfinished_uploads(store, "alice") == {}


def test_an_upload_the_owner_policy_does_not_allow_fails_alone(tmp_path, jobs):
    """In a job, one owner outside the policy refuses the whole request; the queue fails that upload
    before batching, with a reason of its own, and the other tenant's trains."""
    import yaml

    from cluster.policy import POLICY_KEY
    from cluster.store import open_store

    store = open_store((tmp_path / "s").as_uri())
    jobs.store = store
    store.put_bytes(POLICY_KEY, yaml.safe_dump({"owners": {"alice": [f"{tmp_path / 's'}/uploads/alice/"]}}).encode())
    ok = commit_upload(store, "alice", "bo", None, photos(1))
    refused = commit_upload(store, "bob", "cup", None, photos(2))
    d = Dispatcher(store, jobs, config(min_batch=1))
    assert len(d.tick().submitted) == 1
    state = upload_state(store, "bob", "cup", refused.id)
    assert state["status"] == FAILED and "owner policy" in state["reason"], state
    assert "alice" not in state["reason"] and str(tmp_path) not in state["reason"]
    jobs.run_all()
    d.tick()
    assert upload_state(store, "alice", "bo", ok.id)["status"] == READY
    store.put_bytes(POLICY_KEY, b"owners: [not, a, mapping]")  # broken: nothing is batched, it says why
    later = commit_upload(store, "alice", "mug", None, photos(3))
    report = d.tick()
    assert report.submitted == [] and report.errors
    assert upload_state(store, "alice", "mug", later.id)["status"] == QUEUED
