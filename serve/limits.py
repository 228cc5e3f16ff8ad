"""Request limits, and the check that turns an OpenAI request into a `Chat` within them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from yollava.prompt import Message, mentions

from serve.images import ImageError, ImageLimits, decode_data_url
from serve.schemas import Chat, ChatCompletionRequest, ImagePart, RequestError, TextPart


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

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels)


def to_chat(req: ChatCompletionRequest, limits: Limits) -> Chat:
    """Validate a request against `limits` and decode its photos; RequestError on any problem."""
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
                images.append(decode_data_url(p.image_url.url, limits.image, f"{where}.content[{j}]"))
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
    return Chat(messages, images, refs, max_tokens, req.temperature, req.top_p, req.stops, req.seed)
