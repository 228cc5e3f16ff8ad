"""End to end on a local Ray (2 CPUs): requests in, concepts in the store, each one usable."""

import json
import random

import pytest
import torch

import cluster.personalize as job_mod
from cluster.keys import done_key, subject_record_key
from cluster.personalize import JobOptions, run_job
from cluster.request import load_request
from cluster.store import open_store
from tests.cluster.conftest import MULTIPART
from tests.cluster.helpers import SUBJECTS, photo_folder, write_request
from yollava.generate import GenerationRequest, Generator, SamplingParams
from yollava.mining import image_sha256
from yollava.prompt import Message

pytestmark = pytest.mark.slow


def run(path, tmp_path, **options):
    opts = JobOptions(progress=False, storage_path=str(tmp_path / "ray_results"), **options)
    return run_job(load_request(str(path)), opts)


def by_label(summary):
    return {f"{r['owner']}/{r['name']}": r for r in summary["subjects"]}


def assert_answers(store, tiny, owner, name):
    art = store.get_concept(owner, name, expect_fingerprint=tiny.fingerprint)
    assert art.owner == owner and art.name == name
    req = GenerationRequest([Message("user", f"Describe <{name}>.")], [art.rows], [],
                            SamplingParams(max_new_tokens=3))
    out = Generator(tiny).generate([req])[0]
    assert out.token_ids and out.finish_reason in ("stop", "length")
    return art


def test_three_subjects_two_owners_bad_subject_privacy_and_resubmission(ray_local, tmp_path, tiny, monkeypatch):
    from cluster.resources import shares

    asked = []
    real_request = job_mod.job_request

    def spy(job_id, bundles):
        asked.append((job_id, bundles))
        return real_request(job_id, bundles)

    monkeypatch.setattr(job_mod, "job_request", spy)
    trunc = photo_folder(tmp_path / "photos" / "carol" / "broken", 7)
    data = (trunc / "1.png").read_bytes()
    (trunc / "1.png").write_bytes(data[: len(data) // 2])
    alice_photo = tmp_path / "photos" / "alice" / "bo" / "1.png"  # also slipped into the pool
    store_dir = tmp_path / "store"
    path = write_request(tmp_path, store_dir.as_uri(), pool_extra=[str(alice_photo)],
                         extra=[{"owner": "carol", "name": "broken", "photos": "photos/carol/broken"}])
    summary = run(path, tmp_path, workers=2, pack_size=2)
    rows = by_label(summary)
    assert summary["counts"] == {"trained": 3, "invalid": 1}
    assert "broken/1.png" in rows["carol/broken"]["reason"]
    store = open_store(store_dir.as_uri())
    for owner, name in SUBJECTS:
        assert rows[f"{owner}/{name}"]["version"] == 1 and rows[f"{owner}/{name}"]["seconds"] > 0
        art = assert_answers(store, tiny, owner, name)
        assert store.exists(done_key(owner, name, art.metrics["subject_key"]))
    assert store.get_json(f"jobs/{summary['job_id']}/summary.json")["counts"] == summary["counts"]
    assert asked == [(summary["job_id"], [{"CPU": 1}, {"CPU": 1}])]  # this job's share: its workers
    assert summary["job_id"] not in shares()  # released at the end

    # Privacy: every photo a subject trained on is its own or from the pool, never another owner's.
    owner_photos = {o: {image_sha256(p.read_bytes()) for p in (tmp_path / "photos" / o).rglob("*.png")}
                    for o in ("alice", "bob")}
    for owner, name in SUBJECTS:
        record = store.get_json(f"jobs/{summary['job_id']}/subjects/{owner}/{name}.json")
        used = set(record["usage"]["positive"]) | set(record["usage"]["negative"])
        assert record["usage"]["negative"], "negatives were used"
        for other, photos in owner_photos.items():
            if other != owner:
                assert not used & photos, f"{owner}/{name} trained on {other}'s photos"
    assert image_sha256(alice_photo.read_bytes()) not in summary_pool_ids(store, summary)

    # Resubmission trains nothing, and reuses the pool index; --force trains a new version.
    monkeypatch.setattr("cluster.negatives.embed_pool", lambda *a, **k: pytest.fail("pool re-embedded"))
    again = run(path, tmp_path)
    assert again["counts"] == {"done-before": 3, "invalid": 1}
    assert all(store.versions(o, n) == [1] for o, n in SUBJECTS)
    forced = run(path, tmp_path, force=True, pack_size=4, local=True)  # same worker code, no Ray startup
    assert forced["counts"] == {"trained": 3, "invalid": 1}
    assert all(store.versions(o, n) == [1, 2] for o, n in SUBJECTS)


def summary_pool_ids(store, summary):
    from cluster.keys import index_prefix

    return json.loads(store.get_bytes(f"{index_prefix(summary['negative_pool'])}/ids.json"))["ids"]


def test_s3_store_and_s3_photos(ray_local, tmp_path, tiny, s3_client, s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    local = write_request(tmp_path, "unused", subjects=SUBJECTS[:2], pool=4)
    for p in (tmp_path / "photos" / "alice" / "bo").iterdir():
        s3_client.upload_file(str(p), s3_bucket, f"photos/alice/bo/{p.name}")
    body = load_request(str(local)).model_dump()
    body["subjects"][0]["photos"] = f"s3://{s3_bucket}/photos/alice/bo/"
    body["store"] = f"s3://{s3_bucket}/store"
    s3_client.put_object(Bucket=s3_bucket, Key="req.json", Body=json.dumps(body).encode())
    summary = run_job(load_request(f"s3://{s3_bucket}/req.json"),
                      JobOptions(progress=False, storage_path=str(tmp_path / "rr")))
    assert summary["counts"] == {"trained": 2}
    store = open_store(f"s3://{s3_bucket}/store", endpoint_url=s3_endpoint, **MULTIPART)
    for owner, name in SUBJECTS[:2]:
        assert_answers(store, tiny, owner, name)
    assert store.get_json(f"jobs/{summary['job_id']}/summary.json")["job_id"] == summary["job_id"]


def test_worker_killed_at_a_random_moment_loses_nothing_and_trains_nothing_twice(ray_local, tmp_path):
    """The Ray Train worker gets SIGKILL from outside at a random moment of the job (bench.faults):
    every subject ends with exactly one loadable version, and the job still succeeds. Also, the
    job's autoscaler request is its own share: an operator's request in force before survives it.
    (`python -m bench.reliability --parts kill` runs 10 of these.)"""
    from bench.reliability import job_ok, kill_run
    from cluster import ops

    ops.scale(gpus=1, cpus_per_gpu=2)
    try:
        row = kill_run(tmp_path, delay_s=random.Random().uniform(0.5, 3.0))
        assert ops.resource_request() == [{"GPU": 1, "CPU": 2}]
    finally:
        ops.scale(None, release=True)
    assert row["killed"], f"the worker was not killed: {row}"
    assert (row["lost"], row["trained_twice"], row["unreadable"]) == ([], [], []), row
    assert job_ok(row), row


SUMMARY_FIELDS = {"job_id", "base_model", "base_fingerprint", "store", "recipe", "seconds", "negative_pool", "error",
                  "counts", "subjects"}
TRAINED_RECORD_FIELDS = {"owner", "name", "key", "status", "seconds", "worker", "version", "metrics", "usage"}
DONE_MARKER_FIELDS = {"owner", "name", "key", "version", "job_id", "seconds"}


class FailsAfterFit:
    """The real trainer, whose run then fails anyway: every record is written, the run is not a success."""

    def __init__(self, trainer):
        self.trainer = trainer

    def fit(self):
        self.trainer.fit()
        raise RuntimeError("worker group lost after the last report")


def test_training_that_fails_after_every_record_was_written_fails_the_job(ray_local, tmp_path, monkeypatch,
                                                                          capsys):
    make_trainer = job_mod.make_trainer
    monkeypatch.setattr(job_mod, "make_trainer", lambda *args: FailsAfterFit(make_trainer(*args)))
    store_dir = tmp_path / "store"
    path = write_request(tmp_path, store_dir.as_uri(), subjects=SUBJECTS[:1], pool=0)
    code = job_mod.main([str(path), "--no-progress", "--job-id", "job-lost", "--storage-path", str(tmp_path / "rr")])
    out, err = capsys.readouterr()
    why = "RuntimeError: worker group lost after the last report"
    assert code == 1
    assert f"error: job job-lost: training failed: {why}" in err
    assert f"training failed: {why}" in out  # under the summary table
    store = open_store(store_dir.as_uri())
    summary = store.get_json("jobs/job-lost/summary.json")
    assert set(summary) == SUMMARY_FIELDS
    assert (summary["counts"], summary["error"]) == ({"trained": 1}, why)  # every subject recorded, still failed
    record = store.get_json(subject_record_key("job-lost", "alice", "bo"))
    assert set(record) == TRAINED_RECORD_FIELDS and set(record["usage"]) == {"positive", "negative"}
    assert set(store.get_json(done_key("alice", "bo", record["key"]))) == DONE_MARKER_FIELDS


DEEPSPEED = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}


def test_deepspeed_zero3_matches_the_plain_path(ray_local, tmp_path, monkeypatch):
    path = write_request(tmp_path, "unused", subjects=SUBJECTS[:2], pool=3)  # mining runs sharded too
    request = load_request(str(path))
    a = run_job(request.model_copy(update={"store": (tmp_path / "plain").as_uri()}),
                JobOptions(progress=False, local=True, pack_size=2))  # the plain path, in this process
    b = run_job(request.model_copy(update={"store": (tmp_path / "ds").as_uri()}),
                JobOptions(progress=False, storage_path=str(tmp_path / "rr"), workers=2, pack_size=2,
                           deepspeed=DEEPSPEED))
    assert a["counts"] == b["counts"] == {"trained": 2}
    plain_worker, ds_worker = a["subjects"][0]["worker"], b["subjects"][0]["worker"]
    assert (ds_worker["zero3"], ds_worker["world"]) == (True, 2)
    assert ds_worker["local_backbone_elements"] < 0.6 * plain_worker["local_backbone_elements"]  # sharded
    sa, sb = open_store((tmp_path / "plain").as_uri()), open_store((tmp_path / "ds").as_uri())
    for owner, name in SUBJECTS[:2]:
        x, y = sa.get_concept(owner, name), sb.get_concept(owner, name)
        assert x.metrics["loss"] == pytest.approx(y.metrics["loss"], rel=1e-4, abs=1e-5)
        torch.testing.assert_close(x.rows.embed, y.rows.embed, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.rows.head, y.rows.head, rtol=1e-4, atol=1e-5)
