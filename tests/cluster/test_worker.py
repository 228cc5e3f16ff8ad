"""The worker's pieces without Ray: concept init under sharding, privacy guard, the --local path."""

import io
import json

import pytest
import torch

from cluster.personalize import main
from cluster.store import open_store
from cluster.worker import ShardedBackbone, SubjectTask, check_private, deepspeed_config
from tests.cluster.helpers import SUBJECTS, write_request
from yollava.recipe import PhotoRef, Sample, TrainingSet
from yollava.trainer import ConceptBank


def test_bank_from_stats_initialises_like_the_concept_bank(tiny):
    ref, bank = ConceptBank(tiny, seed=3), ConceptBank.from_stats(ConceptBank.init_stats(tiny), seed=3)
    ref.add("bo", 4)
    bank.add("bo", 4)
    torch.testing.assert_close(ref.embed["bo"], bank.embed["bo"], rtol=0, atol=0)
    torch.testing.assert_close(ref.head["bo"], bank.head["bo"], rtol=0, atol=0)


def test_sharded_backbone_remembers_its_sizes(tiny):
    sb = ShardedBackbone(tiny.model_id, tiny.model, tiny.tokenizer, tiny.image_processor, tiny.fingerprint,
                         shape=(7, 5))
    assert (sb.vocab_size, sb.hidden_size, sb.fingerprint) == (7, 5, tiny.fingerprint)


def test_deepspeed_config_needs_stage_3():
    assert deepspeed_config({"zero_optimization": {"stage": 3}})["train_micro_batch_size_per_gpu"] == 1
    with pytest.raises(ValueError, match="stage"):
        deepspeed_config({"zero_optimization": {"stage": 2}})


def test_privacy_guard_refuses_a_photo_that_is_neither_own_nor_pool():
    t = SubjectTask("bob", "bo", "0" * 64, ["b1"], [])
    ok = TrainingSet("bo", [Sample("bo", "positive", [], PhotoRef("bob/bo/b1")),
                            Sample("bo", "negative", [], PhotoRef("p1"))])
    check_private(ok, t, ["p1"])
    leak = TrainingSet("bo", [Sample("bo", "negative", [], PhotoRef("alice/bo/a1"))])
    with pytest.raises(RuntimeError, match="alice/bo/a1"):
        check_private(leak, t, ["p1"])


def test_one_command_local_run_then_resubmission(tmp_path, capsys):
    store = tmp_path / "store"
    path = write_request(tmp_path, str(store), pool=4)
    assert main([str(path), "--local", "--no-progress", "--pack-size", "2"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["counts"] == {"trained": 3}
    assert "alice/bo" in out and "trained" in out
    assert [(c.owner, c.name, c.version) for c in open_store(str(store)).list_concepts()] == \
        sorted((o, n, 1) for o, n in SUBJECTS)
    assert main([str(path), "--local", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"] == {"done-before": 3}


def test_a_subject_failing_the_privacy_guard_is_not_trained(tmp_path, capsys, monkeypatch):
    """The guard runs before a subject's set joins its pack: a leaking set is recorded failed and never
    trained, and its pack mates train as usual."""
    import cluster.worker as worker
    from yollava.recipe import PhotoRef, Sample

    real = worker.build_sets

    def leaky(backbone, specs, *args, **kw):
        sets = real(backbone, specs, *args, **kw)
        if (specs[0].owner, specs[0].name) == ("alice", "bo"):
            sets[0].train.append(Sample("bo", "negative", sets[0].train[0].messages, PhotoRef("carol/x/secret.png")))
        return sets

    monkeypatch.setattr(worker, "build_sets", leaky)
    store = tmp_path / "store"
    path = write_request(tmp_path, str(store), pool=4)
    assert main([str(path), "--local", "--no-progress", "--pack-size", "3"]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["counts"] == {"trained": 2, "failed": 1}
    trained = {(c.owner, c.name) for c in open_store(str(store)).list_concepts()}
    assert trained == {(o, n) for o, n in SUBJECTS if (o, n) != ("alice", "bo")}


def test_pack_scaling_bench_runs_small(capsys):
    from bench import pack_scaling

    result = pack_scaling.main(["--subjects", "2", "--packs", "1", "2", "--epochs", "1", "--repeat", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["seconds_per_subject"]) == {"1", "2"}
    assert all(v > 0 for v in result["seconds_per_subject"].values())


# -- a worker killed between the steps of a write (what an external SIGKILL can hit) ----------------


def killed_job(tmp_path, tiny, job_id="job-k"):
    """One subject (alice/bo) of a job, its photos in memory, as a restarted worker would get it."""
    from bench.reliability import RECIPE, photo
    from cluster.packing import make_packs
    from cluster.worker import JobConfig
    from yollava.mining import image_sha256

    data = []
    for i in range(3):
        buf = io.BytesIO()
        photo(i).save(buf, format="PNG")
        data.append(buf.getvalue())
    task = SubjectTask("alice", "bo", "ab" * 32, [image_sha256(d) for d in data], data)
    return JobConfig(job_id, (tmp_path / "store").as_uri(), "tiny", tiny.fingerprint, RECIPE,
                     make_packs([task], 1)), task


def test_killed_after_the_manifest_before_the_marker_the_restart_finishes_the_bookkeeping(tmp_path, tiny):
    from cluster.keys import done_key
    from cluster.worker import PackRunner
    from tests.conftest import random_rows
    from yollava.artifacts import ConceptArtifact

    job, task = killed_job(tmp_path, tiny)
    store = open_store(job.store_uri)
    store.put_concept(ConceptArtifact("alice", random_rows(tiny, "bo", k=2), "tiny", tiny.fingerprint,
                                      metrics={"subject_key": task.key, "job_id": job.job_id}))
    out = PackRunner(job, tiny).run([task])["alice/bo"]
    assert (out["status"], out["version"], out["recovered"]) == ("trained", 1, True)
    assert store.versions("alice", "bo") == [1]  # not trained again
    assert store.get_json(done_key("alice", "bo", task.key))["version"] == 1


def test_killed_after_claiming_a_version_the_restart_trains_into_the_next(tmp_path, tiny):
    from cluster.keys import done_key
    from cluster.worker import PackRunner

    job, task = killed_job(tmp_path, tiny)
    store = open_store(job.store_uri)
    store.put_bytes("concepts/alice/bo/v1/claims/killed-writer", b"{}")  # and nothing after it
    out = PackRunner(job, tiny).run([task])["alice/bo"]
    assert (out["status"], out["version"]) == ("trained", 2)
    assert store.versions("alice", "bo") == [2]
    assert store.get_concept("alice", "bo").metrics["subject_key"] == task.key
    assert store.get_json(done_key("alice", "bo", task.key))["version"] == 2
