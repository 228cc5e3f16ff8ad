"""The batch scheduler without Ray: concurrent requests share batches and keep their solo answers."""

import asyncio

from cluster.store import open_store
from serve.engine import ChatEngine
from serve.schemas import Chat
from tests.serve.conftest import save_concept
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
