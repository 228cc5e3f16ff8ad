"""OpenAI chat-completions request and response models, and their conversion to a `Chat`.

Requests are strict: unknown fields and wrong types are refused (400), not
coerced. Every list and string has a length bound here, so validation work is
bounded whatever the body holds (the configurable, usually lower, bounds are
`serve.limits.Limits`; `check_raw` applies the message count before this model
validates anything). `seed` fits a 64-bit generator (0..2^63-1) and a
temperature is 0 (greedy) or at least `MIN_TEMPERATURE`, below which scores
divided by it overflow. The fields accepted are the ones the official `openai` client sends
for the features served; everything else (tools, logprobs, n>1...) is an
unknown or unsupported field, named in the error.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from yollava.generate import MAX_SEED, MIN_TEMPERATURE
from yollava.prompt import Message

_STRICT = ConfigDict(extra="forbid", strict=True)
# Fixed by the protocol (OpenAI's own bounds), not configurable: `serve.limits.Limits` holds those.
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_USER_CHARS = 256
# Ceilings of the schema itself, whatever the config says (it can only lower them).
MAX_MESSAGES = 1024
MAX_PARTS = 64  # content parts of one message
MAX_TEXT_CHARS = 2**20  # one text (Limits.max_text_chars bounds all text of a request)
MAX_URL_CHARS = 48 * 2**20  # one data URL (Limits.max_image_bytes bounds what it decodes to)
MAX_NAME_CHARS = 256


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(max_length=MAX_URL_CHARS)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)

    @field_validator("content", mode="before")
    @classmethod
    def _content_size(cls, v):
        """Before the parts are validated one by one (a wrong type is left to the type check)."""
        if isinstance(v, list) and len(v) > MAX_PARTS:
            raise ValueError(f"{len(v)} content parts; at most {MAX_PARTS}")
        if isinstance(v, str) and len(v) > MAX_TEXT_CHARS:
            raise ValueError(f"{len(v)} characters; at most {MAX_TEXT_CHARS}")
        return v


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = _STRICT
    model: str = Field(max_length=MAX_NAME_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature={v!r} is below {MIN_TEMPERATURE}: use 0 for greedy decoding")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v):
        """Counted before the items are validated (a wrong type is left to the type check)."""
        stops = [v] if isinstance(v, str) else v if isinstance(v, list) else []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"{len(stops)} stop strings; at most {MAX_STOPS}")
        if any(isinstance(s, str) and not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be 1-{MAX_STOP_CHARS} characters")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


@dataclass
class Chat:
    """A validated conversation, ready for the model deployment (picklable)."""

    messages: list[Message]
    images: list  # PIL images, in the order of the turns that use them
    refs: list[str]  # concept references as typed (`bo`, `alice/bo`), unique, in order
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None = None
    request_id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    stream: bool = True  # False: the text comes in one piece at the end (nothing to send before)


class RequestError(ValueError):
    """A request the service refuses; `param` names the field, `status` the HTTP code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_body(chat: Chat, model: str, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {
        "id": chat.request_id, "object": "chat.completion", "created": chat.created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(chat: Chat, model: str, delta: dict, finish: str | None = None,
               usage_: dict | None = None, choices: bool = True) -> dict:
    body = {"id": chat.request_id, "object": "chat.completion.chunk", "created": chat.created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
