"""Generation: batched == one by one, and under churn (rows joining, leaving, failing) every answer
is its solo answer; streaming adds up; incremental text equals the whole decode."""

import random

import pytest

from tests.conftest import random_photo, random_rows
from yollava import generate
from yollava.generate import (MAX_SEED, MIN_TEMPERATURE, GenerationRequest, Generator, IncrementalText, RowError,
                              SamplingParams)
from yollava.prompt import Message, PromptEncoder


def _requests(tiny):
    bo, mam = random_rows(tiny, "bo", seed=1, scale=3), random_rows(tiny, "mam", seed=2, scale=3)
    return [
        GenerationRequest([Message("user", "Is <bo> in the photo?", 1)], [bo], [random_photo(1)],
                          SamplingParams(max_new_tokens=12)),
        GenerationRequest([Message("user", "Tell me about <mam> and <bo>.")], [mam, bo], [],
                          SamplingParams(max_new_tokens=7)),
        GenerationRequest([Message("user", "hello"), Message("assistant", "hi"), Message("user", "again?", 1)],
                          [], [random_photo(2)], SamplingParams(max_new_tokens=9)),
        GenerationRequest([Message("user", "sample <bo>")], [bo], [],
                          SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.8, seed=11)),
    ]


def test_batched_equals_one_by_one(tiny):
    gen = Generator(tiny)
    reqs = _requests(tiny)
    together = gen.generate(reqs)
    for req, res in zip(reqs, together):
        alone = gen.generate([req])[0]
        assert alone.token_ids == res.token_ids
        assert alone.text == res.text
        assert alone.finish_reason == res.finish_reason


def test_the_models_own_mask_gives_the_same_answers(tiny):
    """Decode steps hand SDPA their own (B, 1, 1, T) mask; a sliding-window model gets the 2-D mask
    and builds its own per layer: both give the same tokens."""
    gen = Generator(tiny)
    reqs = _requests(tiny)
    ours = gen.generate(reqs)
    dec = gen.decoder()
    assert dec._own_mask  # tiny has no sliding window
    dec._own_mask = False
    done = {}
    dec.admit(dict(enumerate(reqs)))
    while len(dec):
        done.update({k: v.token_ids for k, kind, v in dec.step() if kind == "done"})
    assert [done[i] for i in range(len(reqs))] == [r.token_ids for r in ours]


def test_max_tokens_and_streaming_deltas(tiny):
    gen = Generator(tiny)
    reqs = _requests(tiny)
    deltas: dict[int, str] = {}
    out = gen.generate(reqs, on_delta=lambda b, d: deltas.__setitem__(b, deltas.get(b, "") + d))
    for b, (req, res) in enumerate(zip(reqs, out)):
        assert len(res.token_ids) <= req.params.max_new_tokens
        if res.finish_reason == "length":
            assert len(res.token_ids) == req.params.max_new_tokens
        assert deltas.get(b, "") == res.text  # the stream adds up to the answer


def _steer_rows(tiny, gen, req):
    """Make the identifier the top token at step 1 and the latents even stronger."""
    first = gen.generate([GenerationRequest(req.messages, req.concepts, req.images,
                                            SamplingParams(max_new_tokens=1))])[0].token_ids[0]
    row = tiny.lm_head.weight[first].clone()
    c = req.concepts[0]
    c.head[0] = 3 * row
    c.head[1:] = 30 * row
    return c


def test_identifier_generated_latents_never(tiny):
    gen = Generator(tiny)
    bo = random_rows(tiny, "bo", seed=3)
    req = GenerationRequest([Message("user", "Who is this?", 1)], [bo], [random_photo(4)],
                            SamplingParams(max_new_tokens=5))
    _steer_rows(tiny, gen, req)
    res = gen.generate([req])[0]
    V = tiny.vocab_size
    assert res.token_ids[0] == V  # the identifier's virtual id
    assert all(not (V < t <= V + bo.tokens.num_latent) for t in res.token_ids)
    assert res.text.startswith("<bo>")


def test_stop_strings_cut_text(tiny):
    gen = Generator(tiny)
    req = _requests(tiny)[0]
    full = gen.generate([req])[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = gen.generate([GenerationRequest(req.messages, req.concepts, req.images,
                                          SamplingParams(max_new_tokens=12, stop=(stop,)))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]


def test_seeded_sampling_is_reproducible_and_really_samples(tiny):
    """Same seed, same tokens; another seed, other tokens; and neither is the greedy answer
    (a sampler that fell back to greedy would pass reproducibility alone)."""
    from dataclasses import replace

    gen = Generator(tiny)
    req = _requests(tiny)[3]
    assert gen.generate([req])[0].token_ids == gen.generate([req])[0].token_ids

    def run(**params):
        r = GenerationRequest(req.messages, req.concepts, req.images, replace(req.params, **params))
        return gen.generate([r])[0].token_ids

    seed1, seed2, greedy = run(seed=1), run(seed=2), run(temperature=0.0)
    assert seed1 != seed2 and seed1 != greedy and seed2 != greedy, (seed1, seed2, greedy)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop=("",))])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_photo_count_must_match(tiny):
    with pytest.raises(ValueError, match="1 photo"):
        Generator(tiny).generate([GenerationRequest([Message("user", "hi", 1)], [], [])])


# -- continuous batching: rows join and leave between steps ------------------------------------

def _churn_requests(tiny, n, rng):
    """Random prompts, concepts, photos, lengths; greedy and seeded rows; some with stop strings."""
    names = ["bo", "mam", "kit", "rex"]
    rows = {nm: random_rows(tiny, nm, seed=20 + i, scale=3) for i, nm in enumerate(names)}
    words = ["Describe", "Is", "in the photo", "and", "please", "what colour", "tell me", "a mug", "?"]
    reqs = []
    for i in range(n):
        cs = rng.sample(names, rng.randint(0, 2))
        photos = rng.randint(0, 1)
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12 if i % 3 else 30)))
        text += "".join(f" <{c}>" for c in cs)
        sampled = i % 2 == 1
        params = SamplingParams(max_new_tokens=rng.randint(1, 24), temperature=0.8 if sampled else 0.0,
                                top_p=0.9 if sampled else 1.0, seed=rng.randint(0, MAX_SEED) if sampled else None,
                                stop=("e t",) if i % 5 == 4 else ())
        reqs.append(GenerationRequest([Message("user", text, photos)], [rows[c] for c in cs],
                                      [random_photo(100 + i)] * photos, params))
    return reqs


def _poisoned(tiny):
    bad = random_rows(tiny, "bad", seed=99)
    bad.embed[:] = float("nan")  # a damaged concept: NaN in its rows
    return GenerationRequest([Message("user", "Tell me about <bad>.")], [bad], [],
                             SamplingParams(max_new_tokens=10))


def _drive(dec, reqs, rng, cancel_p=0.0, extra=()):
    """Admit requests at random steps, cancel some at random; every event per key, in order."""
    waiting = list(range(len(reqs)))
    rng.shuffle(waiting)
    extra = list(extra)
    events: dict = {}
    cancelled: set = set()
    steps = 0
    while waiting or extra or len(dec):
        newcomers = {}
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if waiting:
                k = waiting.pop()
                newcomers[k] = reqs[k]
        if extra and steps == 3:
            k, req = extra.pop()
            newcomers[k] = req
        for key, kind, value in dec.admit(newcomers) if newcomers else []:
            events.setdefault(key, []).append((kind, value))
        for key in [k for k in list(dec._rows) if k not in cancelled]:
            if rng.random() < cancel_p:
                dec.cancel(key)
                cancelled.add(key)
        for key, kind, value in dec.step():
            assert key not in cancelled, f"row {key} got {kind!r} after its cancel"
            events.setdefault(key, []).append((kind, value))
        steps += 1
        assert steps < 2000
    return events, cancelled


def _check_stream(evs):
    """Deltas, then exactly one done: nothing after it, the deltas add up to its text."""
    kinds = [k for k, _ in evs]
    assert kinds.count("done") == 1 and kinds[-1] == "done" and "error" not in kinds, kinds
    text = "".join(v for k, v in evs if k == "delta")
    assert all(v for k, v in evs if k == "delta")  # no empty deltas
    assert text == evs[-1][1].text  # no delta twice, none missing
    return evs[-1][1]


@pytest.mark.parametrize("seed,spare", [(0, None), (1, None), (2, (1, 1))])
def test_churn_keeps_every_answer_and_isolates_the_poisoned_row(tiny, seed, spare, monkeypatch):
    """Random arrivals, lengths and cancellations, one poisoned row: every surviving request's
    answer (greedy and seeded) is its solo answer, the poisoned row alone gets an error, a cancelled
    row gets no more text, and no text is delivered twice. With `spare` (columns, rows) the cache's
    buffers run out of room all the time, so rebuilding them is exercised too."""
    if spare is not None:
        monkeypatch.setattr(generate, "SPARE_COLUMNS", spare[0])
        monkeypatch.setattr(generate, "SPARE_ROWS", spare[1])
    rng = random.Random(seed)
    gen = Generator(tiny)
    reqs = _churn_requests(tiny, 14, rng)
    solo = [gen.generate([r])[0] for r in reqs]
    events, cancelled = _drive(gen.decoder(), reqs, rng, cancel_p=0.03, extra=[("poison", _poisoned(tiny))])
    (kind, err), = events["poison"]
    assert kind == "error" and isinstance(err, RowError) and "NaN" in str(err)
    assert cancelled and len(cancelled) < len(reqs) - 4  # the schedule cancels some, not most
    for i, (req, ref) in enumerate(zip(reqs, solo)):
        evs = events.get(i, [])
        if i in cancelled:
            assert "error" not in [k for k, _ in evs]
            sent = "".join(v for k, v in evs if k == "delta")
            assert ref.text.startswith(sent)  # what it got before the cancel is its own answer
            continue
        res = _check_stream(evs)
        assert (res.token_ids, res.text, res.finish_reason, res.prompt_tokens) == \
            (ref.token_ids, ref.text, ref.finish_reason, ref.prompt_tokens), i
    assert any(r.params.temperature > 0 and i not in cancelled for i, r in enumerate(reqs))


def test_a_row_whose_forward_raises_fails_alone(tiny):
    """An exception inside the model for one row's inputs (here: at one position only that row
    reaches) fails that row; the step is rerun on halves and the others keep their solo answers."""
    gen = Generator(tiny)
    rng = random.Random(5)
    reqs = _churn_requests(tiny, 6, rng)
    solo = [gen.generate([r])[0] for r in reqs]
    longest = max(len(gen.encode(r)) + r.params.max_new_tokens for r in reqs)
    long_req = GenerationRequest([Message("user", "Describe the photo please. " * 20)], [], [],
                                 SamplingParams(max_new_tokens=8))
    trap = len(gen.encode(long_req)) + 2  # the position of its third generated token
    assert trap > longest + 2  # no other row ever reaches it

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is not None and pos.shape[1] == 1 and bool((pos == trap).any()):
            raise RuntimeError(f"simulated kernel failure at position {trap}")

    handle = tiny.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        dec = gen.decoder()
        events: dict = {}
        for key, kind, value in dec.admit({**dict(enumerate(reqs)), "long": long_req}):
            events.setdefault(key, []).append((kind, value))
        while len(dec):
            for key, kind, value in dec.step():
                events.setdefault(key, []).append((kind, value))
    finally:
        handle.remove()
    kinds = [k for k, _ in events["long"]]
    assert kinds[-1] == "error" and "done" not in kinds and "simulated kernel failure" in str(events["long"][-1][1])
    assert "".join(v for k, v in events["long"] if k == "delta") == \
        gen.generate([long_req])[0].text[:len("".join(v for k, v in events["long"] if k == "delta"))]
    for i, ref in enumerate(solo):
        assert _check_stream(events[i]).token_ids == ref.token_ids


def test_kv_cache_holds_only_live_rows(tiny):
    """Retired rows leave the cache, and columns only they used are cut off."""
    gen = Generator(tiny)
    long_req = GenerationRequest([Message("user", "Describe the photo please. " * 10)], [], [],
                                 SamplingParams(max_new_tokens=2))
    short = GenerationRequest([Message("user", "hi")], [], [], SamplingParams(max_new_tokens=30))
    dec = gen.decoder()
    dec.admit({"long": long_req, "short": short})
    assert len(dec) == 2 and dec.kv_tokens == 2 * len(gen.encode(long_req))
    assert dec.kv_bound() == 2 * max(len(gen.encode(long_req)) + 2, len(gen.encode(short)) + 30)
    for _ in range(3):
        dec.step()
    assert len(dec) == 1 and "long" not in dec
    assert dec.kv_tokens == len(gen.encode(short)) + 3  # the long row's padding is gone


def test_steps_retirements_and_newcomers_work_in_place(tiny):
    """Once the cache has room, a step, a row leaving and a newcomer joining write into the same
    buffers (no copy of the whole cache), and the answers are still the solo ones."""
    gen = Generator(tiny)
    reqs = {i: GenerationRequest([Message("user", "hi " * (i + 1))], [], [], SamplingParams(max_new_tokens=n))
            for i, n in enumerate([3, 12, 12])}
    late = {f"late{i}": GenerationRequest([Message("user", "hello " * i)], [], [], SamplingParams(max_new_tokens=5))
            for i in (1, 2)}
    solo = {k: gen.generate([r])[0].token_ids for k, r in {**reqs, **late}.items()}
    dec = gen.decoder()
    done = {}

    def step():
        for key, kind, value in dec.step():
            assert kind != "error", value
            if kind == "done":
                done[key] = value.token_ids

    dec.admit(reqs)
    step()  # the first step moves the prefill's cache into buffers with room to spare
    buf = dec._batch.kv[0][0]
    step()
    step()  # row 0 ends here
    assert len(dec) == 2 and 0 in done
    dec.admit(late)  # one takes the slot row 0 left, one a spare row
    assert len(dec) == 4
    while len(dec):
        step()
        if len(dec):
            assert dec._batch.kv[0][0] is buf  # the same buffer all along
    assert done == solo


def test_incremental_text_equals_whole_decode(tiny):
    """Pieces pushed token by token add up to PromptEncoder.decode of all ids, for random ids
    with multi-byte characters, special tokens and concept identifiers (latents never appear)."""
    from tests.real_vocab import llava15_backbone

    for bb in (tiny, llava15_backbone()):
        enc = PromptEncoder.for_backbone(bb)
        bo = random_rows(bb, "bo", k=2).tokens
        V, n = bb.vocab_size, len(bb.tokenizer)
        rng = random.Random(3)
        samples = [bb.tokenizer("héllo wörld — ☃ 猫 ok", add_special_tokens=False)["input_ids"]]
        for _ in range(40):
            ids = [rng.randrange(n) for _ in range(rng.randint(1, 30))]
            for _ in range(rng.randint(0, 3)):
                ids.insert(rng.randrange(len(ids) + 1), V)  # <bo>'s identifier
            samples.append(ids)
        for ids in samples:
            inc = IncrementalText(enc, [bo])
            whole, out = enc.decode(ids, [bo]), ""
            for j in range(1, len(ids) + 1):
                out += inc.push(ids[:j], final=j == len(ids))
                assert whole.startswith(out), (ids, j, out)  # nothing sent is ever taken back
            assert out == whole, ids


@pytest.mark.parametrize("bad, words", [(dict(temperature=1e-300), "temperature=1e-300"),
                                        (dict(seed=2**64), "seed=18446744073709551616"),
                                        (dict(seed=-1), "seed=-1")])
def test_sampling_params_refuse_what_would_break_a_row(bad, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**bad)
    SamplingParams(temperature=MIN_TEMPERATURE, seed=MAX_SEED)  # the bounds themselves are fine


def test_unstreamed_rows_decode_once_with_the_same_text(tiny):
    """stream=False: no text before the end, then all of it in one piece, the same as streamed
    (stop strings still cut at the same place: those rows are decoded every step)."""
    from dataclasses import replace

    gen = Generator(tiny)
    reqs = _churn_requests(tiny, 10, random.Random(8))
    streamed = gen.generate(reqs)
    dec = gen.decoder()
    events: dict = {}
    for key, kind, value in dec.admit({i: replace(r, stream=False) for i, r in enumerate(reqs)}):
        events.setdefault(key, []).append((kind, value))
    while len(dec):
        for key, kind, value in dec.step():
            events.setdefault(key, []).append((kind, value))
    for i, (req, ref) in enumerate(zip(reqs, streamed)):
        evs = events[i]
        if not req.params.stop:
            assert [k for k, _ in evs] == (["delta", "done"] if ref.text else ["done"])
        assert _check_stream(evs).text == ref.text and evs[-1][1].token_ids == ref.token_ids
    assert any(r.params.stop for r in reqs)
