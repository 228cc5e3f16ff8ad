"""The engine without Ray: continuous batching keeps every solo answer under churn, a poisoned row
fails alone, clients that leave are retired, tenants take turns, and each limit answers its 4xx."""

import asyncio
import logging
import random
import threading
from types import SimpleNamespace

import pytest

from cluster.store import open_store
from serve.concepts import Sharing
from serve.engine import ChatEngine, context_length
from serve.limits import TenantLimits
from serve.schemas import Chat
from tests.cluster.conftest import DUMMY_AWS_ENV
from tests.serve.conftest import free_port, save_concept, tamper
from yollava.artifacts import TENSORS_FILE
from yollava.prompt import Message, mentions


def chat(text, max_tokens=8, **kw):
    return Chat([Message("user", text)], [], mentions(text), max_tokens, 0.0, 1.0, (), **kw)


async def collect(engine, tenant, c):
    """The events, consecutive deltas merged (how a reader gets the text grouped is not the answer)."""
    out = []
    async for ev in engine.chat(tenant, c):
        if ev["event"] == "delta" and out and out[-1]["event"] == "delta":
            out[-1] = {"event": "delta", "text": out[-1]["text"] + ev["text"]}
        else:
            out.append(ev)
    return out


def text_of(events):
    return "".join(e["text"] for e in events if e["event"] == "delta")


def test_concurrent_equals_solo_and_batches(tmp_path, tiny):
    store = open_store((tmp_path / "s").as_uri())
    for i in range(6):
        save_concept(store, tiny, "alice", f"c{i}", i)
    engine = ChatEngine(tiny, store, revalidate_s=0)
    reqs = [chat(f"About <c{i}>?", max_tokens=4 + i) for i in range(6)] + [chat("no concept", 5)]

    async def go():
        solo = [await collect(engine, "alice", r) for r in reqs]
        together = await asyncio.gather(*(collect(engine, "alice", r) for r in reqs))
        return solo, together

    solo, together = asyncio.run(go())
    assert [text_of(s) for s in solo] == [text_of(t) for t in together]
    assert [s[-1] for s in solo] == [t[-1] for t in together]  # finish reason and token counts
    assert engine.scheduler.stats.max_batch >= 4  # decoded together (they arrive within a step or two)
    assert solo[0][0]["concepts"] == ["<c0>"] and solo[-1][0]["concepts"] == []


def test_context_overflow_is_a_request_error(tmp_path, tiny):
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()))
    engine.context_length = 50
    events = asyncio.run(collect(engine, "alice", chat("hello " * 40)))
    assert len(events) == 1 and events[0]["event"] == "error" and events[0]["status"] == 400
    assert events[0]["code"] == "context_length_exceeded"


def test_a_row_whose_model_call_raises_fails_alone(tmp_path, tiny):
    """An error inside the model for one request's inputs: that request gets a 500 of its own after
    the text it already had (never sent again), the request decoded with it gets its solo answer
    (the step is rerun on halves to find the culprit)."""
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()))
    boom_text = "boom " * 30
    boom_len = len(engine.generator.encode(_request(boom_text)))

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is not None and pos.shape[1] == 1 and bool((pos == boom_len + 2).any()):
            raise RuntimeError("simulated device error")  # when the boom row is fed its 3rd token

    fine_solo = asyncio.run(collect(engine, "a", chat("fine", 8)))
    boom_solo = text_of(asyncio.run(collect(engine, "b", chat(boom_text, 8))))
    handle = tiny.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        async def go():
            return await asyncio.gather(collect(engine, "a", chat("fine", 8)), collect(engine, "b", chat(boom_text, 8)))

        fine, boom = asyncio.run(go())
    finally:
        handle.remove()
    assert fine == fine_solo
    assert boom[-1] == {"event": "error", "status": 500, "message": "the model failed to answer this request",
                        "code": "internal_error", "param": None}
    assert {e["event"] for e in boom[:-1]} <= {"start", "delta"} and boom[0]["event"] == "start"
    sent = text_of(boom)
    assert sent and boom_solo.startswith(sent)  # what it got before failing, once, and nothing else
    assert engine.scheduler.stats.failed == 1


def _request(text, max_tokens=8):
    from yollava.generate import GenerationRequest, SamplingParams

    return GenerationRequest([Message("user", text)], [], [], SamplingParams(max_tokens))


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


# -- continuous batching under churn --------------------------------------------------------------


def _nan_concept(store, tiny, owner, name):
    from tests.conftest import random_rows
    from yollava.artifacts import ConceptArtifact

    rows = random_rows(tiny, name, seed=7)
    rows.embed[:] = float("nan")  # stored and loaded fine, poison in the model
    store.put_concept(ConceptArtifact(owner, rows, "tiny", tiny.fingerprint))


async def _client(engine, tenant, c, delay, cancel_after):
    """Arrive after `delay` s; leave (close the stream) after `cancel_after` deltas, if given."""
    await asyncio.sleep(delay)
    events, stream = [], engine.chat(tenant, c)
    async for ev in stream:
        events.append(ev)
        if cancel_after is not None and sum(e["event"] == "delta" for e in events) >= cancel_after:
            await stream.aclose()
            return events, True
    return events, False


def test_churn_keeps_solo_answers_and_the_poisoned_row_fails_alone(tmp_path, tiny):
    """Random arrivals, lengths and cancellations, greedy and seeded, one row poisoned by a NaN
    concept: every request that ran to its end has its solo answer (text, finish, token counts),
    the poisoned one gets a 500 of its own and nobody else an error; text is never sent twice
    (the deltas are exactly the answer), and a client that left got a prefix of its answer."""
    rng = random.Random(4)
    store = open_store((tmp_path / "s").as_uri())
    for i in range(6):
        save_concept(store, tiny, ("alice", "bob")[i % 2], f"c{i}", i)
    _nan_concept(store, tiny, "carol", "bad")
    engine = ChatEngine(tiny, store, revalidate_s=60)
    jobs = []
    for i in range(18):
        tenant = ("alice", "bob")[i % 2]
        refs = " ".join(f"<c{j}>" for j in rng.sample(range(i % 2, 6, 2), rng.randint(0, 2)))
        sampled = i % 3 == 0
        c = Chat([Message("user", f"Tell me about {refs} " + "please " * rng.randint(0, 12))], [],
                 mentions(refs), rng.randint(1, 24), 0.9 if sampled else 0.0, 0.9 if sampled else 1.0, (),
                 seed=rng.randint(0, 2**63 - 1) if sampled else None)
        jobs.append((tenant, c, rng.uniform(0, 0.15), 2 if i % 7 == 3 else None))
    poison = ("carol", chat("Is <bad> here?", 12), 0.05, None)

    solo = [asyncio.run(collect(engine, t, c)) for t, c, _, _ in jobs]

    async def go():
        return await asyncio.gather(*(_client(engine, *j) for j in jobs + [poison]))

    out = asyncio.run(go())
    *rows, (bad, _) = out
    assert bad[0]["event"] == "start" and bad[-1]["event"] == "error" and bad[-1]["status"] == 500
    left = 0
    for (events, cancelled), ref in zip(rows, solo):
        assert all(e["event"] != "error" for e in events)
        if cancelled:
            left += 1
            assert text_of(ref).startswith(text_of(events))
            continue
        # start, the deltas (however a slow reader got them grouped) adding up to the solo text: none
        # twice, none lost; the end with the same finish and counts
        assert (events[0], text_of(events), events[-1]) == (ref[0], text_of(ref), ref[-1])
        assert all(e["event"] == "delta" and e["text"] for e in events[1:-1])
    assert left >= 2 and engine.scheduler.stats.max_batch >= 4


def test_a_client_that_leaves_is_retired_at_the_next_step(tmp_path, tiny):
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()))
    long = chat("Describe a cat in great detail.", 64)
    full = asyncio.run(collect(engine, "a", long))
    assert full[-1]["completion_tokens"] == 64  # it would run all 64 steps

    async def go():
        stream = engine.chat("a", long)
        deltas = 0
        async for ev in stream:
            deltas += ev["event"] == "delta"
            if deltas == 2:
                steps = engine.scheduler.stats.steps
                await stream.aclose()
                break
        for _ in range(200):  # the decode thread retires it
            if not len(engine.scheduler.decoder) and engine.scheduler.stats.cancelled:
                break
            await asyncio.sleep(0.01)
        return steps

    steps_at_leave = asyncio.run(go())
    s = engine.scheduler.stats
    assert s.cancelled == 1 and len(engine.scheduler.decoder) == 0
    assert s.steps <= steps_at_leave + 2  # not decoded on after its client left


def test_a_flooding_tenant_does_not_delay_another(tmp_path, tiny):
    """One tenant has 40 long requests waiting or running; another's request is admitted at the
    next step (tenants take turns, and one tenant holds at most its share of the batch)."""
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()), max_batch_size=8)
    sched = engine.scheduler
    assert sched.max_rows_per_tenant == 4

    async def go():
        flood = [asyncio.ensure_future(collect(engine, "flood", chat(f"Describe cat number {i}.", 48)))
                 for i in range(40)]
        while sched.stats.rows < 4:  # the flood is decoding
            await asyncio.sleep(0.005)
        waiting = sched.waiting("flood")
        quiet = await collect(engine, "quiet", chat("hello", 4))
        await asyncio.gather(*flood)
        return waiting, quiet

    waiting, quiet = asyncio.run(go())
    assert waiting > 20  # the flood was queued when the quiet request came
    assert quiet[-1]["event"] == "end"
    (steps_waited,) = [w for t, w, _ in sched.stats.admissions if t == "quiet"]
    assert steps_waited <= 1
    assert max(n for t, n, _ in sched.stats.admissions) > 4  # (the flood itself did wait)


def test_tenants_take_turns_at_admission(tmp_path, tiny):
    """Without a share cap, a tenant with many requests queued does not go before one that came
    later with one request: the first place that frees up is the newcomer's."""
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()), max_batch_size=4, max_rows_per_tenant=4)
    sched = engine.scheduler

    async def go():
        flood = [asyncio.ensure_future(collect(engine, "flood", chat(f"Describe cat number {i}.", 24)))
                 for i in range(20)]
        while sched.stats.rows < 4:
            await asyncio.sleep(0.005)
        admitted_before = sched.stats.rows
        waiting = sched.waiting("flood")
        quiet = await collect(engine, "quiet", chat("hello", 4))
        await asyncio.gather(*flood)
        return admitted_before, waiting, quiet

    admitted_before, waiting, quiet = asyncio.run(go())
    assert waiting >= 10 and quiet[-1]["event"] == "end"
    order = [t for t, _, _ in sched.stats.admissions]
    assert "quiet" in order[admitted_before:admitted_before + 2], order  # next (or the one already picked)


def _count_prefills(engine, live=None):
    """Wrap the decoder's admit: the list of how many requests each prefill admitted (and, into
    `live`, how many rows were decoding before it)."""
    sizes, decoder = [], engine.scheduler.decoder
    admit = decoder.admit

    def counted(requests, encoded=None):
        sizes.append(len(requests))
        if live is not None:
            live.append(len(decoder))
        return admit(requests, encoded)

    decoder.admit = counted
    return sizes


def test_admissions_wait_for_several_free_rows(tmp_path, tiny):
    """With a queue, rows are refilled several at a time (one prefill for `admit_min_rows`
    requests, not one per freed row); the answers are still the solo answers."""
    store = open_store((tmp_path / "s").as_uri())
    reqs = [chat(f"Tell me about item {i}.", 3 + (7 * i) % 17) for i in range(24)]
    solo = [asyncio.run(collect(ChatEngine(tiny, store), "a", c)) for c in reqs]
    engine = ChatEngine(tiny, store, max_batch_size=8, max_rows_per_tenant=8, admit_min_rows=4,
                        admit_max_wait_steps=1000)
    live: list[int] = []
    sizes = _count_prefills(engine, live)

    async def go():
        return await asyncio.gather(*(collect(engine, "a", c) for c in reqs))

    assert asyncio.run(go()) == solo
    assert sum(sizes) == len(reqs)
    # an admission into a running batch waited for 4 free rows (requests still arriving may join
    # an empty or half-empty batch in smaller groups); refills of 4 or more did happen
    assert all(before == 0 or 8 - before >= 4 for before in live), list(zip(live, sizes))
    assert any(before >= 1 and n >= 4 for before, n in zip(live, sizes)), list(zip(live, sizes))


def test_an_admission_waits_at_most_admit_max_wait_steps(tmp_path, tiny):
    """One free row is enough once requests have waited `admit_max_wait_steps` steps for more."""
    engine = ChatEngine(tiny, open_store((tmp_path / "s").as_uri()), max_batch_size=4, max_rows_per_tenant=4,
                        admit_min_rows=4, admit_max_wait_steps=3)
    sizes = _count_prefills(engine)

    async def go():
        first = [asyncio.ensure_future(collect(engine, "a", chat("hi", n))) for n in (2, 40, 40, 40)]
        while engine.scheduler.stats.rows < 4:
            await asyncio.sleep(0.001)
        late = await collect(engine, "b", chat("hello", 2))
        await asyncio.gather(*first)
        return late

    assert asyncio.run(go())[-1]["event"] == "end"
    # the first four may come in one prefill or start an empty batch one by one; the late one alone,
    # while three long rows still ran
    assert sum(sizes[:-1]) == 4 and sizes[-1] == 1, sizes
    (waited,) = [w for t, w, _ in engine.scheduler.stats.admissions if t == "b"]
    assert waited >= 3  # it did wait for more rows to free up, then no longer


@pytest.mark.parametrize("kw,words", [({"admit_min_rows": 0}, "admit_min_rows=0 must be >= 1"),
                                      ({"admit_min_rows": 33}, "at most max_batch_size=32"),
                                      ({"admit_max_wait_steps": -1}, "admit_max_wait_steps=-1 must be >= 0")])
def test_admission_settings_are_checked(tiny, kw, words):
    from serve.engine import Scheduler
    from yollava.generate import Generator

    with pytest.raises(ValueError, match=words):
        Scheduler(Generator(tiny), max_batch_size=32, **kw)


def test_events_for_a_closed_event_loop_cancel_their_requests():
    """A loop closed before it drained its events: the next events for it cancel its requests
    (their rows are retired) instead of piling up."""
    from serve.engine import _Outbox

    loop = asyncio.new_event_loop()
    job = SimpleNamespace(loop=loop, queue=asyncio.Queue(), cancelled=False)
    box = _Outbox()
    box.send([(job, ("delta", "a"))])  # a wake-up is scheduled, never run
    loop.close()
    assert not job.cancelled
    box.send([(job, ("delta", "b"))])
    assert job.cancelled and not box._pending
    other = SimpleNamespace(loop=loop, queue=asyncio.Queue(), cancelled=False)
    box.send([(other, ("delta", "c"))])  # nothing pending: the wake-up itself finds the loop closed
    assert other.cancelled and not box._pending


def test_admission_stays_within_the_kv_budget(tmp_path, tiny):
    """Rows are admitted only while the padded cache they can reach fits the budget; answers are
    still the solo answers, and a request that could never fit is a 400 naming the budget."""
    store = open_store((tmp_path / "s").as_uri())
    probe = ChatEngine(tiny, store)
    reqs = [chat(f"Tell me about item {i}.", 6 + i % 3) for i in range(8)]
    reserve = max(len(probe.generator.encode(_request(c.messages[0].text))) + c.max_tokens for c in reqs)
    engine = ChatEngine(tiny, store, kv_budget_tokens=2 * reserve + 1)
    solo = [asyncio.run(collect(engine, "a", c)) for c in reqs]

    async def go():
        return await asyncio.gather(*(collect(engine, ("a", "b")[i % 2], c) for i, c in enumerate(reqs)))

    assert asyncio.run(go()) == solo
    assert engine.scheduler.stats.max_batch == 2
    (err,) = asyncio.run(collect(engine, "a", chat("hello " * 5, 2 * reserve)))
    assert err["status"] == 400 and f"KV budget of {2 * reserve + 1}" in err["message"]


# -- the store: its own pool, timeouts, stale entries, a budget for unknown names -----------------


def test_a_cached_concept_is_served_stale_when_the_store_errors(tmp_path, tiny):
    store = open_store((tmp_path / "s").as_uri())
    save_concept(store, tiny, "alice", "bo", 1)
    save_concept(store, tiny, "alice", "mam", 2)
    engine = ChatEngine(tiny, store, revalidate_s=0)
    before = asyncio.run(collect(engine, "alice", chat("Is <bo> here?")))

    def down(*a, **kw):
        raise OSError("connection refused")

    store.latest_version = down
    after = asyncio.run(collect(engine, "alice", chat("Is <bo> here?")))
    assert after == before and after[0]["concepts"] == ["<bo>"]
    assert engine.cache.stats.stale == 1
    (event,) = asyncio.run(collect(engine, "alice", chat("Is <mam> here?")))  # never cached: nothing to serve
    assert (event["status"], event["code"]) == (503, "concept_unavailable")


def test_a_hung_store_is_a_timeout_not_a_hang(tmp_path, tiny, caplog):
    store = open_store((tmp_path / "s").as_uri())
    save_concept(store, tiny, "alice", "bo", 1)
    engine = ChatEngine(tiny, store, revalidate_s=0, store_threads=2, store_timeout_s=0.2)
    cached = asyncio.run(collect(engine, "alice", chat("Is <bo> here?")))
    release = threading.Event()

    def latest_version(*a, **kw):  # hangs
        release.wait(5)
        return 1

    store.latest_version = latest_version
    try:
        with caplog.at_level(logging.WARNING, logger="serve.engine"):
            (event,) = asyncio.run(collect(engine, "alice", chat("Is <zed> here?")))
        assert (event["status"], event["code"]) == (503, "concept_unavailable")
        assert "did not answer latest_version within 0.2 s" in caplog.text
        assert asyncio.run(collect(engine, "alice", chat("Is <bo> here?"))) == cached  # stale, not stuck
        assert engine.store_calls.pool._max_workers == 2
    finally:
        release.set()


def test_lookups_of_unknown_names_have_a_budget_per_tenant(tmp_path, tiny):
    """Names that do not exist cost a store lookup each: a tenant that spent its budget gets a 429
    with Retry-After for uncached names, while its cached concepts and other tenants go on."""
    store = open_store((tmp_path / "s").as_uri())
    save_concept(store, tiny, "alice", "bo", 1)
    now = [0.0]
    engine = ChatEngine(tiny, store, revalidate_s=60, clock=lambda: now[0],
                        tenant_limits=TenantLimits(unknown_concepts_per_s=0.5, unknown_concepts_burst=3))
    ok = asyncio.run(collect(engine, "alice", chat("Is <bo> with <x1> and <x2>?")))
    assert ok[0]["concepts"] == ["<bo>"] and ok[-1]["event"] == "end"
    assert asyncio.run(collect(engine, "alice", chat("<x3> <x4>")))[-1]["event"] == "end"  # the last token
    (err,) = asyncio.run(collect(engine, "alice", chat("Who is <x5>?")))
    assert (err["status"], err["code"]) == (429, "rate_limit_exceeded")
    assert err["retry_after"] == pytest.approx(4.0)  # 1 - (3 - 4) tokens at 0.5/s
    assert asyncio.run(collect(engine, "alice", chat("Is <bo> here?")))[-1]["event"] == "end"
    assert asyncio.run(collect(engine, "bob", chat("Who is <x5>?")))[-1]["event"] == "end"
    now[0] += 4.0
    assert asyncio.run(collect(engine, "alice", chat("Who is <x5>?")))[-1]["event"] == "end"
