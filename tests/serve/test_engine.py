"""The batch scheduler without Ray: concurrent requests share batches and keep their solo answers."""

import asyncio
import logging
from types import SimpleNamespace

import pytest

from cluster.store import open_store
from serve.concepts import Sharing
from serve.engine import ChatEngine, context_length
from serve.schemas import Chat
from tests.cluster.conftest import DUMMY_AWS_ENV
from tests.serve.conftest import free_port, save_concept, tamper
from yollava.artifacts import TENSORS_FILE
from yollava.prompt import Message, mentions


def chat(text, max_tokens=8, **kw):
    return Chat([Message("user", text)], [], mentions(text), max_tokens, 0.0, 1.0, (), **kw)


async def collect(engine, tenant, c):
    return [ev async for ev in engine.chat(tenant, c)]


def text_of(events):
    return "".join(e["text"] for e in events if e["event"] == "delta")


def test_concurrent_equals_solo_and_batches(tmp_path, tiny):
    store = open_store((tmp_path / "s").as_uri())
    for i in range(6):
        save_concept(store, tiny, "alice", f"c{i}", i)
    engine = ChatEngine(tiny, store, revalidate_s=0, batch_wait_s=0.05)
    reqs = [chat(f"About <c{i}>?", max_tokens=4 + i) for i in range(6)] + [chat("no concept", 5)]

    async def go():
        solo = [await collect(engine, "alice", r) for r in reqs]
        together = await asyncio.gather(*(collect(engine, "alice", r) for r in reqs))
        return solo, together

    solo, together = asyncio.run(go())
    assert [text_of(s) for s in solo] == [text_of(t) for t in together]
    assert [s[-1] for s in solo] == [t[-1] for t in together]  # finish reason and token counts
    assert engine.scheduler.stats.max_batch == len(reqs)
    assert solo[0][0]["concepts"] == ["<c0>"] and solo[-1][0]["concepts"] == []


def test_context_overflow_is_a_request_error(tmp_path, tiny):
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()))
    engine.context_length = 50
    events = asyncio.run(collect(engine, "alice", chat("hello " * 40)))
    assert len(events) == 1 and events[0]["event"] == "error" and events[0]["status"] == 400
    assert events[0]["code"] == "context_length_exceeded"


def test_a_failing_batch_is_retried_row_by_row(tmp_path, tiny):
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()), batch_wait_s=0.05)
    real = engine.generator.generate

    def flaky(requests, on_delta=None):
        if len(requests) > 1 or requests[0].messages[0].text == "boom":
            raise RuntimeError("simulated device error")
        return real(requests, on_delta)

    engine.scheduler.generator.generate = flaky

    async def go():
        return await asyncio.gather(collect(engine, "a", chat("fine")), collect(engine, "a", chat("boom")))

    fine, boom = asyncio.run(go())
    assert fine[-1]["event"] == "end"
    assert boom[-1] == {"event": "error", "status": 500, "message": "the model failed to answer this request",
                        "code": "internal_error", "param": None}


def test_store_failure_is_a_503_without_details(tmp_path, tiny):
    store = open_store((tmp_path / "s").as_uri())
    save_concept(store, tiny, "alice", "bo", 1)
    engine = ChatEngine(tiny, store, revalidate_s=0)

    def down(*a, **kw):
        raise OSError("connection refused to http://10.0.0.1:9000 with secret credentials")

    store.latest_version = down
    (event,) = asyncio.run(collect(engine, "alice", chat("Is <bo> here?")))
    assert event["status"] == 503 and event["code"] == "concept_unavailable"
    assert "10.0.0.1" not in event["message"]
    assert asyncio.run(collect(engine, "alice", chat("no concept here")))[-1]["event"] == "end"


def test_unreachable_s3_is_a_503(tiny, monkeypatch):
    for key, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    store = open_store("s3://yollava-down/root", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    engine = ChatEngine(tiny, store, revalidate_s=0)
    (event,) = asyncio.run(collect(engine, "alice", chat("Is <bo> here?")))
    assert (event["status"], event["code"]) == (503, "concept_unavailable")
    assert "127.0.0.1" not in event["message"] and "yollava-down" not in event["message"]


def test_tampered_concept_is_a_500_naming_it_as_typed(tmp_path, tiny, caplog):
    store = open_store((tmp_path / "s").as_uri())
    save_concept(store, tiny, "alice", "bo", 1)
    tamper(store, "alice", "bo")
    Sharing(store).share("alice", "bo", "bob")
    engine = ChatEngine(tiny, store, revalidate_s=0)
    for tenant, ref in (("alice", "<bo>"), ("bob", "<alice/bo>")):
        with caplog.at_level(logging.ERROR, logger="serve.engine"):
            (event,) = asyncio.run(collect(engine, tenant, chat(f"Is {ref} here?")))
        assert (event["status"], event["code"]) == (500, "concept_integrity_failed")
        assert f"concept {ref} failed its integrity check" in event["message"]
        assert "retry" not in event["message"]
        for inside in (str(tmp_path), "sha256", "manifest", "version", TENSORS_FILE):
            assert inside not in event["message"]
        assert "tensors sha256 does not match" in caplog.text  # the store's words: in the log only
        caplog.clear()
    assert asyncio.run(collect(engine, "alice", chat("no concept here")))[-1]["event"] == "end"


def test_a_bug_below_the_store_is_not_a_retry_later(tmp_path, tiny):
    store = open_store((tmp_path / "s").as_uri())
    engine = ChatEngine(tiny, store, revalidate_s=0)

    def broken(*a, **kw):
        raise TypeError("latest_version() got an unexpected keyword argument")

    store.latest_version = broken
    with pytest.raises(TypeError, match="unexpected keyword"):
        asyncio.run(collect(engine, "alice", chat("Is <bo> here?")))


def test_context_length_is_read_from_the_model_config(tiny, tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    assert ChatEngine(tiny, store).context_length == tiny.config.text_config.max_position_embeddings == 2048
    assert context_length(SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=300))) == 300
    assert context_length(SimpleNamespace(max_position_embeddings=777)) == 777  # a text-only model
    for bad in (SimpleNamespace(text_config=SimpleNamespace()), SimpleNamespace(max_position_embeddings=None)):
        with pytest.raises(ValueError, match="max_position_embeddings=None"):
            context_length(bad)
    no_limit = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace()), fingerprint="x")
    with pytest.raises(ValueError, match="context length"):  # at startup, not a guessed 4096
        ChatEngine(no_limit, store)


def test_seeded_sampling_is_reproducible_and_not_greedy(tmp_path, tiny):
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()))

    def sample(seed, temperature=0.9):
        c = Chat([Message("user", "Describe a cat.")], [], [], 12, temperature, 0.9, (), seed=seed)
        return text_of(asyncio.run(collect(engine, "alice", c)))

    greedy = sample(None, temperature=0.0)
    one, again, two = sample(1), sample(1), sample(2)
    assert one == again
    assert len({one, two, greedy}) == 3, (one, two, greedy)
