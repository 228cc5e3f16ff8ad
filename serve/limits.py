"""Request and tenant limits, and the check that turns an OpenAI request into a `Chat` within them.

`Limits` bounds one request; `TenantLimits` bounds a tenant over time (a
token-bucket rate, requests in flight, lookups of concept names that do not
exist). Both are defined here only; `AppArgs` and config.yaml take them as is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from yollava.prompt import Message, mentions

from serve.images import ImageError, ImageLimits, decode_data_url
from serve.schemas import MAX_MESSAGES, Chat, ChatCompletionRequest, ImagePart, RequestError, TextPart


class Limits(BaseModel):
    """Every request limit and its default, defined here only: `AppArgs.limits`, config.yaml's
    `args.limits` and the image decoder's `ImageLimits` all come from this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4  # per request
    max_concepts: int = 8  # distinct `<ref>`s per request
    max_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 128
    max_messages: int = 64
    max_text_chars: int = 32_000  # all text of a request

    @field_validator("*")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"limit {info.field_name}={value} must be >= 1")
        return value

    @model_validator(mode="after")
    def _default_within_max(self) -> "Limits":
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens={self.max_tokens}")
        return self

    @model_validator(mode="after")
    def _within_schema(self) -> "Limits":
        if self.max_messages > MAX_MESSAGES:
            raise ValueError(f"max_messages={self.max_messages} exceeds the schema's ceiling of {MAX_MESSAGES}")
        return self

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels)


class TenantLimits(BaseModel):
    """Per tenant, counted by each replica on its own (an ingress replica for the rate and the
    requests in flight, a model replica for unknown concept names): with N replicas a tenant gets
    up to N times these. Over a limit: 429 with Retry-After."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    requests_per_s: float = Field(20.0, gt=0, description="token-bucket refill: sustained requests per second")
    burst: int = Field(64, ge=1, description="token-bucket size: requests at once after a quiet spell")
    max_in_flight: int = Field(64, ge=1, description="requests being answered or waiting, per ingress replica")
    unknown_concepts_per_s: float = Field(2.0, gt=0, description="store lookups of `<names>` that do not exist")
    unknown_concepts_burst: int = Field(64, ge=1)


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; `take` spends one if there is one."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate={rate} must be > 0 and burst={burst} >= 1")
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.stamp = float(burst), clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._refill()
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> float:
        """Spend a token and return 0, or return the seconds until one is there (nothing spent)."""
        wait = self.wait()
        if wait == 0:
            self.tokens -= 1
        return wait

    def charge(self, n: float) -> None:
        """Spend `n` after the fact (the balance may go below zero: the wait grows)."""
        self._refill()
        self.tokens -= n


class Refused(Exception):
    """Over a tenant limit: `reason` (a metric label), `retry_after` seconds."""

    def __init__(self, message: str, reason: str, retry_after: float):
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


@dataclass
class Slot:
    """A request in flight; `release` (idempotent) gives the place back."""

    gate: "TenantGate"
    tenant: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate._leave(self.tenant)


class TenantGate:
    """The ingress's per-tenant rate limit (token bucket) and cap on requests in flight.

    One event loop uses it (not thread-safe). Tenants are authenticated, so the
    tables are bounded by the keys file."""

    def __init__(self, limits: TenantLimits, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    def enter(self, tenant: str) -> Slot:
        """A slot for one request of `tenant`, or Refused (nothing is spent when refused)."""
        lim = self.limits
        if self.in_flight(tenant) >= lim.max_in_flight:
            raise Refused(f"tenant {tenant} has {lim.max_in_flight} requests in flight, the most allowed; "
                          "retry when one has finished", "in_flight", 1.0)
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket(lim.requests_per_s, lim.burst, self.clock)
        wait = bucket.take()
        if wait > 0:
            raise Refused(f"rate limit of {lim.requests_per_s:g} requests/s (burst {lim.burst}) reached for "
                          f"tenant {tenant}; retry in {wait:.1f} s", "rate", wait)
        self._in_flight[tenant] = self.in_flight(tenant) + 1
        return Slot(self, tenant)

    def _leave(self, tenant: str) -> None:
        n = self._in_flight.get(tenant, 0) - 1
        if n < 0:
            raise RuntimeError(f"tenant {tenant}: a slot was released twice")
        if n:
            self._in_flight[tenant] = n
        else:
            del self._in_flight[tenant]


def check_raw(doc: dict, limits: Limits) -> None:
    """Cheap checks on the parsed JSON before schema validation (which costs per item): a body of
    600k messages is refused here at once."""
    messages = doc.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise RequestError(f"{len(messages)} messages; at most {limits.max_messages}", "messages")


def to_chat(req: ChatCompletionRequest, limits: Limits,
            fit: Callable[[object, str], object] | None = None) -> Chat:
    """Validate a request against `limits` and decode its photos; RequestError on any problem.

    `fit(image, where)`: shrinks a decoded photo to what the model's vision tower takes
    (`serve.photos.PhotoFit`), so only that travels on; ImageError if the model cannot take it."""
    if len(req.messages) > limits.max_messages:
        raise RequestError(f"{len(req.messages)} messages; at most {limits.max_messages}", "messages")
    messages, images, chars = [], [], 0
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role in ("system", "developer"):
            raise RequestError(f"{where}.role={m.role!r}: system messages are not supported "
                               "(the model's system prompt is fixed)", f"{where}.role")
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        photos = [(j, p) for j, p in enumerate(parts) if isinstance(p, ImagePart)]
        if photos and m.role != "user":
            raise RequestError(f"{where}: only user messages may carry images", f"{where}.content")
        if len(images) + len(photos) > limits.max_images:
            raise RequestError(f"more than {limits.max_images} images in one request", f"{where}.content",
                               "too_many_images")
        for j, p in photos:
            try:
                image = decode_data_url(p.image_url.url, limits.image, f"{where}.content[{j}]")
                images.append(fit(image, f"{where}.content[{j}]") if fit is not None else image)
            except ImageError as e:
                raise RequestError(str(e), f"{where}.content[{j}].image_url.url", "invalid_image") from None
        text = "\n".join(texts)
        chars += len(text)
        if not text.strip() and not photos:
            raise RequestError(f"{where} is empty", f"{where}.content")
        messages.append(Message(m.role, text, images=len(photos)))
    if chars > limits.max_text_chars:
        raise RequestError(f"the messages hold {chars} characters; at most {limits.max_text_chars}", "messages")
    if messages[0].role != "user" or messages[-1].role != "user":
        raise RequestError("the conversation must start and end with a user message", "messages")
    for i in range(1, len(messages)):
        if messages[i].role == messages[i - 1].role:
            raise RequestError(f"messages[{i}]: roles must alternate user/assistant", f"messages[{i}].role")
    refs = list(dict.fromkeys(r for m in messages for r in mentions(m.text)))
    if len(refs) > limits.max_concepts:
        raise RequestError(f"{len(refs)} concept references; at most {limits.max_concepts} per request",
                           "messages", "too_many_concepts")
    max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise RequestError(f"max_tokens={max_tokens} exceeds the limit {limits.max_tokens}", "max_tokens")
    return Chat(messages, images, refs, max_tokens, req.temperature, req.top_p, req.stops, req.seed,
                stream=req.stream)
