"""Tenant limits, input bounds and photo shrinking, without Ray: each limit refuses what it should,
names the value, and one tenant's limits never touch another's."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from serve.app import ApiError, parse_chat_request
from serve.images import ImageError
from serve.limits import Limits, Refused, TenantGate, TenantLimits, TokenBucket, check_raw
from serve.metrics import OTHER, TenantLabels
from serve.photos import PhotoFit
from serve.schemas import ChatCompletionRequest, RequestError


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# -- rate and requests in flight ----------------------------------------------------------------


def test_token_bucket_refills_at_its_rate():
    clock = Clock()
    b = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [b.take() for _ in range(3)] == [0, 0, 0]
    assert b.take() == pytest.approx(0.5)  # one token at 2/s
    clock.t = 0.5
    assert b.take() == 0 and b.take() == pytest.approx(0.5)
    clock.t = 100
    assert b.wait() == 0 and b.tokens == 3  # never more than the burst
    b.charge(5)
    assert b.wait() == pytest.approx(1.5)  # 3 - 5 = -2: three tokens short of one


def test_in_flight_cap_is_per_tenant_and_slots_come_back():
    gate = TenantGate(TenantLimits(max_in_flight=2, burst=100), Clock())
    a1, a2 = gate.enter("alice"), gate.enter("alice")
    with pytest.raises(Refused, match="tenant alice has 2 requests in flight") as e:
        gate.enter("alice")
    assert e.value.reason == "in_flight" and e.value.retry_after_header == "1"
    b = gate.enter("bob")  # another tenant is not affected
    a1.release()
    a1.release()  # idempotent: the place is given back once
    assert gate.in_flight("alice") == 1
    a3 = gate.enter("alice")
    for s in (a2, a3, b):
        s.release()
    assert gate.in_flight("alice") == gate.in_flight("bob") == 0


def test_rate_limit_refuses_with_retry_after_and_spends_nothing_when_refused():
    clock = Clock()
    gate = TenantGate(TenantLimits(requests_per_s=0.5, burst=2, max_in_flight=10), clock)
    gate.enter("alice").release()
    gate.enter("alice").release()
    with pytest.raises(Refused, match=r"rate limit of 0.5 requests/s \(burst 2\) reached for tenant alice") as e:
        gate.enter("alice")
    assert e.value.reason == "rate" and e.value.retry_after == pytest.approx(2.0)
    assert e.value.retry_after_header == "2"
    gate.enter("bob").release()  # bob has his own bucket
    clock.t = 2.0
    gate.enter("alice").release()  # refused attempts did not spend tokens: one is back after 2 s


@pytest.mark.parametrize("bad", [dict(requests_per_s=0), dict(burst=0), dict(max_in_flight=0),
                                 dict(unknown_concepts_burst=0), dict(burts=3)])
def test_bad_tenant_limits_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TenantLimits(**bad)


def test_metrics_labels_are_bounded():
    labels = TenantLabels(max_labels=2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d", OTHER)] == ["a", "b", OTHER, "a", OTHER, OTHER]


# -- what the parser refuses before it costs anything --------------------------------------------


def _parse(body: bytes):
    return parse_chat_request(body, Limits())


def _body(**kw):
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}).encode()


@pytest.mark.parametrize("body, words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
     "nested too deeply"),
    (_body(seed=2**64), "less than or equal to 9223372036854775807"),
    (_body(seed=-1), "greater than or equal to 0"),
    (_body(temperature=1e-300), "temperature=1e-300 is below 0.0001"),
    (_body(stop=["a"] * 1000), "1000 stop strings; at most 4"),
    (_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 100}]),
     "100 content parts; at most 64"),
    (_body(messages=[{"role": "user", "content": "x" * (2**20 + 1)}]), "1048577 characters"),
    (_body(model="m" * 1000), "at most 256 characters"),
])
def test_hostile_bodies_are_a_400_naming_the_problem(body, words):
    with pytest.raises(ApiError) as e:
        _parse(body)
    assert e.value.status == 400 and words in str(e.value)


def test_a_body_of_many_messages_is_refused_before_validation(monkeypatch):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 600_000}).encode()

    def validate(*a, **kw):
        raise AssertionError("validated 600k messages one by one")

    monkeypatch.setattr(ChatCompletionRequest, "model_validate", validate)
    with pytest.raises(ApiError, match="600000 messages; at most 64") as e:
        _parse(body)
    assert e.value.status == 400 and e.value.param == "messages"
    with pytest.raises(RequestError, match="65 messages; at most 64"):
        check_raw({"messages": [{}] * 65}, Limits())


def test_limits_cannot_exceed_the_schema():
    with pytest.raises(ValueError, match="max_messages=5000 exceeds the schema's ceiling of 1024"):
        Limits(max_messages=5000)


# -- photos: shrunk at the ingress, with the model's exact pixels -----------------------------------


def _photo(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(4096, 4096), (1000, 300), (33, 500), (40, 40)])
def test_photo_fit_shrinks_to_the_tower_and_keeps_the_models_pixels(tiny, size):
    fit = PhotoFit.for_backbone(tiny)
    photo = _photo(*size)
    small = fit(photo)
    assert small.size == (32, 32)  # tiny's tower takes 32x32
    assert torch.equal(tiny.preprocess([small]), tiny.preprocess([photo]))  # the same input to the model


def test_photo_fit_survives_pickling(tiny):
    """It travels from the model replica to the ingress."""
    import pickle

    fit = pickle.loads(pickle.dumps(PhotoFit.for_backbone(tiny)))
    assert fit(_photo(100, 80)).size == (32, 32)


def test_a_photo_the_model_cannot_take_is_refused_naming_both_sizes():
    """A processor that does not resize (like mini's) with a photo of another size: the tower
    would fail on it, so the ingress says why instead."""
    proc = CLIPImageProcessor(do_resize=False, do_center_crop=False, size={"shortest_edge": 48},
                              crop_size={"height": 48, "width": 48})
    fit = PhotoFit(proc, (48, 48))
    assert fit(_photo(48, 48)).size == (48, 48)
    with pytest.raises(ImageError, match=r"photo: image of 100x60 pixels becomes 100x60 for this model, "
                                         r"whose vision tower takes 48x48"):
        fit(_photo(100, 60), "photo")


def test_to_chat_passes_photos_through_the_fit(tiny):
    from serve.limits import to_chat

    buf = io.BytesIO()
    _photo(600, 400).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    req = ChatCompletionRequest.model_validate({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]})
    chat = to_chat(req, Limits(), PhotoFit.for_backbone(tiny))
    assert [im.size for im in chat.images] == [(32, 32)]
