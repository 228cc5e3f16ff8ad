"""Self-serve personalization: a tenant uploads photos of a subject, the queue trains it.

    POST /v1/concepts           name, 3-20 photos, optional description: multipart/form-data
                                (fields `name`, `description`, files `photos`) or JSON
                                {"name", "description", "photos": ["data:image/png;base64,...", ...]}
                                -> 202 with the concept's status
    GET  /v1/concepts/{name}    queued / training (progress) / ready (version, metrics) / failed (reason)

Photos are checked exactly as chat photos are (`serve.images`: formats, bytes, pixels
from the header before decoding, decompression bombs), then stored as RGB PNG (no
metadata), at most `max_side` pixels on their longer side, under the caller's own
prefix (`uploads/<tenant>/<name>/...`, `cluster.queue`). The name is the strict concept
name; nothing the caller sends becomes part of a path otherwise. Per tenant quotas:
concepts owned (403), photos per concept (403), subjects queued or training (429 with
Retry-After); a second upload of a concept still queued or training is a 409.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.queue import (FAILED, QUEUED, READY, TRAINING, QueueConfig, tenant_uploads, unfinished_uploads,
                           upload_state)
from cluster.store import ArtifactStore
from serve.images import ALLOWED_FORMATS, ImageError, ImageLimits, decode_data_url, decode_image_bytes
from serve.schemas import MAX_URL_CHARS
from yollava.tokens import NAME_RE


class UploadLimits(BaseModel):
    """Per upload and per tenant (quotas). Counted from the store, per ingress replica's view."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_photos: int = Field(3, ge=1, description="fewer distinct photos than this: 400")
    max_photos: int = Field(20, ge=1, description="quota: photos per concept (403 above)")
    max_concepts: int = Field(100, ge=1, description="quota: concepts a tenant owns, trained or on the way (403)")
    max_queued: int = Field(4, ge=1, description="quota: a tenant's uploads queued or training at once (429)")
    max_body_bytes: int = Field(64 * 2**20, ge=1, description="an upload request's body")
    max_description_chars: int = Field(500, ge=0)
    max_side: int = Field(1024, ge=32, description="photos are stored at most this many pixels on their longer side")
    retry_after_s: int = Field(30, ge=1, description="Retry-After of a 429 for a full queue")


class UploadConfig(BaseModel):
    """`AppArgs.uploads`: the upload API and the queue behind it (absent: no uploads on this service)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    limits: UploadLimits = Field(default_factory=UploadLimits)
    queue: dict = Field(default_factory=dict, description="cluster.queue.QueueConfig fields; base_model is the "
                                                          "service's model unless given")

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: dict) -> dict:
        QueueConfig(**{"base_model": "(the service's model)", **value})  # refused by name at start-up
        return value

    def queue_config(self, model: str) -> QueueConfig:
        return QueueConfig(**{"base_model": model, **self.queue})


class UploadError(Exception):
    """A refused upload: status, message naming the bad value, OpenAI error code and param."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.retry_after = status, code, param, retry_after


@dataclass
class RawUpload:
    name: str
    description: str | None
    photos: list[tuple[str, bytes | str]]  # (label for messages, raw bytes or a data URL)


class JsonUpload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=256)
    description: str | None = Field(None, max_length=10_000)
    photos: list[str] = Field(max_length=256)


def check_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UploadError(400, f"{field}={name[:80]!r} is not a valid concept name: use 1-64 characters from "
                               "a-z, 0-9, '-' and '_', starting with a letter or digit", "invalid_name", field)
    return name


def check_description(text: str | None, limits: UploadLimits) -> str | None:
    if text is None or not text.strip():
        return None
    if len(text) > limits.max_description_chars:
        raise UploadError(400, f"description has {len(text)} characters; at most {limits.max_description_chars}",
                          "invalid_description", "description")
    if any(ord(c) < 32 and c not in "\t\n" for c in text):
        raise UploadError(400, "description holds control characters", "invalid_description", "description")
    return text.strip()


def parse_json_upload(body: bytes) -> RawUpload:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UploadError(400, f"malformed JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise UploadError(400, "malformed JSON: nested too deeply", "invalid_json") from None
    if not isinstance(doc, dict):
        raise UploadError(400, "the request body must be a JSON object", "invalid_json")
    try:
        req = JsonUpload.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise UploadError(400, f"unknown field {loc!r}", "invalid_request", loc) from None
        raise UploadError(400, f"{loc}: {err['msg']}", "invalid_request", loc) from None
    for i, url in enumerate(req.photos):
        if len(url) > MAX_URL_CHARS:
            raise UploadError(400, f"photos[{i}]: data URL longer than {MAX_URL_CHARS} characters",
                              "invalid_image", f"photos[{i}]")
    return RawUpload(req.name, req.description, [(f"photos[{i}]", url) for i, url in enumerate(req.photos)])


def prepare_photos(raw: RawUpload, limits: UploadLimits, image: ImageLimits) -> list[tuple[bytes, dict]]:
    """Validate every photo as chat does, then PNG bytes + {sha256, width, height}; identical photos once."""
    if len(raw.photos) > limits.max_photos:
        raise UploadError(403, f"{len(raw.photos)} photos; the quota is {limits.max_photos} photos per concept",
                          "photo_quota_exceeded", "photos")
    out, seen = [], set()
    for label, data in raw.photos:
        try:
            im = (decode_data_url(data, image, label) if isinstance(data, str)
                  else decode_image_bytes(data, image, label))
        except ImageError as e:
            raise UploadError(400, str(e), "invalid_image", label.split(" ")[0]) from None
        if max(im.size) > limits.max_side:
            im.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
        im.info.clear()  # stored with no metadata: no colour profile, no text chunks
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        png = buf.getvalue()
        digest = hashlib.sha256(png).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        out.append((png, {"sha256": digest, "width": im.width, "height": im.height, "source": label}))
    if len(out) < limits.min_photos:
        dup = f" ({len(raw.photos) - len(out)} duplicate(s) counted once)" if len(out) < len(raw.photos) else ""
        raise UploadError(400, f"{len(out)} distinct photo(s){dup}; a concept needs at least {limits.min_photos}",
                          "too_few_photos", "photos")
    return out


def check_quotas(store: ArtifactStore, tenant: str, name: str, limits: UploadLimits) -> None:
    """409 if this concept is already on the way; 429 if the tenant's queue is full; 403 over the concepts quota."""
    unfinished = unfinished_uploads(store, tenant)
    if name in unfinished:
        state = upload_state(store, tenant, name, unfinished[name])["status"]
        raise UploadError(409, f"concept {name!r} is already {state} (upload {unfinished[name]}); upload again "
                               "once it is ready or failed", "concept_busy", "name")
    if len(unfinished) >= limits.max_queued:
        raise UploadError(429, f"tenant {tenant} has {len(unfinished)} concepts queued or training, the most "
                               f"allowed ({limits.max_queued}); retry when one is ready",
                          "queue_quota_exceeded", None, limits.retry_after_s)
    owned = {r.name for r in store.list_concepts(tenant)} | set(unfinished)
    if name not in owned and len(owned) >= limits.max_concepts:
        raise UploadError(403, f"tenant {tenant} owns {len(owned)} concepts, the quota ({limits.max_concepts}); "
                               "delete one to teach another", "concept_quota_exceeded", "name")


def concept_status(store: ArtifactStore, tenant: str, name: str, uploads: list[str] | None = None) -> dict | None:
    """The concept as the caller sees it: what answers now (version, metrics) and its latest upload."""
    if uploads is None:
        uploads = tenant_uploads(store, tenant).get(name, [])
    version = store.latest_version(tenant, name)
    latest = upload_state(store, tenant, name, uploads[-1]) if uploads else None
    if version is None and (latest is None or latest["status"] == READY):
        return None  # deleted behind the queue's back (cluster.ops), or never existed
    metrics = {}
    if version is not None:
        manifest = store.read_manifest(tenant, name, version) or {}
        metrics = {k: v for k, v in (manifest.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    status = READY if latest is None else latest["status"]
    if status == READY and version is None:
        status = FAILED
    body = {"id": name, "object": "concept", "owner": tenant, "name": name, "status": status,
            "version": version, "metrics": metrics,
            "progress": 1.0 if status == READY else (latest or {}).get("progress", 0.0)}
    if latest is not None:
        body["upload"] = {"id": uploads[-1], **{k: v for k, v in latest.items() if k != "metrics"}}
        if status == FAILED:
            body["reason"] = latest.get("reason")
        if status in (QUEUED, TRAINING):
            body["stage"] = latest.get("stage", status)
    return body


def tenant_statuses(store: ArtifactStore, tenant: str) -> list[dict]:
    """Every concept of the tenant, trained or on the way, by name."""
    uploads = tenant_uploads(store, tenant)
    names = sorted({r.name for r in store.list_concepts(tenant)} | set(uploads))
    out = []
    for name in names:
        body = concept_status(store, tenant, name, uploads.get(name, []))
        if body is not None:
            out.append(body)
    return out


def image_formats() -> list[str]:
    return [f.lower() for f in ALLOWED_FORMATS]
