"""The worker's pieces without Ray: concept init under sharding, privacy guard, the --local path."""

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


def test_pack_scaling_bench_runs_small(capsys):
    from bench import pack_scaling

    result = pack_scaling.main(["--subjects", "2", "--packs", "1", "2", "--epochs", "1", "--repeat", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["seconds_per_subject"]) == {"1", "2"}
    assert all(v > 0 for v in result["seconds_per_subject"].values())
