"""The Ray Serve application: a FastAPI ingress (auth, validation, concepts API) and the model.

    serve run serve.app:build_app store=s3://bucket/prefix model=mini keys=keys.json
    serve deploy serve/config.yaml
    python -m serve --store file:///tmp/store        # one machine, demo keys printed

`ChatIngress` authenticates, applies each tenant's rate limit and cap on
requests in flight, validates (off the event loop) and decodes and shrinks
photos (so nothing bad or oversized reaches the model), owns the concept
listing/sharing API and the upload API (`serve/uploads.py`), and serves the web
page (`/`, `serve/static/`). `ChatModel` holds the base model, the concept cache
and the batch scheduler; every replica can serve every tenant's concepts.
`UploadQueue` (one replica, with `uploads` set) packs the tenants' uploads into
`cluster.personalize` jobs through Ray's job API (`cluster/queue.py`).
"""


import asyncio
import json
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.lifecycle import forget_concept
from cluster.queue import ConceptBusy, Dispatcher, JobApiError, RayJobs, commit_upload
from cluster.store import ConceptNotFound, access_errors, open_store
from yollava.backbone import load_backbone
from yollava.tokens import NAME_RE

from serve.concepts import Sharing
from serve.engine import ChatEngine, set_torch_threads
from serve.keys import KeyRing
from serve.limits import Limits, Refused, Slot, TenantGate, TenantLimits, check_raw, to_chat
from serve.metrics import IngressMetrics, ModelMetrics, TenantLabels
from serve.photos import PhotoFit
from serve.schemas import (Chat, ChatCompletionRequest, RequestError, chunk_body, completion_body,
                           error_body, usage)
from serve.uploads import (RawUpload, UploadConfig, UploadError, check_description, check_quotas, concept_status,
                           image_formats, parse_json_upload, prepare_photos, tenant_statuses)
from serve.uploads import check_name as check_upload_name

STATIC = Path(__file__).resolve().parent / "static"
# The page's files, fixed at import: a request names one of these or gets a 404 (never a path).
STATIC_FILES = {p.name: p for p in STATIC.iterdir() if p.is_file() and not p.name.startswith(".")} \
    if STATIC.is_dir() else {}
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# Nothing from elsewhere: the page's own script and style, photos as data: and blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache"}

log = logging.getLogger(__name__)


class AppArgs(BaseModel):
    """Arguments of `build_app` (`serve run serve.app:build_app key=value ...` or config.yaml `args`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    store: str = Field(description="artifact store: s3://bucket/prefix or file:///path")
    keys: str = Field(description="API keys file (python -m serve.keys create TENANT --keys FILE)")
    model: str = Field("mini", description="base model: Hugging Face id, local path, mini (shipped) or tiny (random)")
    dtype: str | None = Field(None, description="float32 / bfloat16 / float16 (default float32)")
    device: str = Field("auto", description="auto: cuda when the replica has a GPU, else cpu")
    seed: int = Field(0, description="seed of the tiny model's weights")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph...)")
    cache_mb: float = Field(256, gt=0, description="concept cache per model replica, MiB")
    revalidate_s: float = Field(1.0, ge=0, description="how stale a cached concept or share may be")
    max_batch_size: int = Field(32, ge=1, description="rows decoded together (continuous batching)")
    max_rows_per_tenant: int | None = Field(None, ge=1, description="rows one tenant may hold; default half the batch")
    max_prefill_tokens: int = Field(4096, ge=1, description="prompt tokens prefilled per step (one request at least)")
    kv_budget_tokens: int = Field(65536, ge=1, description="KV cache the batch may reach, in tokens (padded)")
    admit_min_rows: int | None = Field(None, ge=1, description="free rows that make an admission due (one prefill "
                                                               "for several requests); default an eighth of the batch")
    admit_max_wait_steps: int = Field(8, ge=0, description="steps requests wait for admit_min_rows free rows "
                                                           "before fewer are admitted")
    store_threads: int = Field(8, ge=1, description="threads for store reads per model replica")
    store_timeout_s: float = Field(10.0, gt=0, description="a store read slower than this is an error")
    max_tenant_labels: int = Field(64, ge=0, description="tenants named in metrics labels; the rest are 'other'")
    tenant_limits: TenantLimits = Field(default_factory=TenantLimits, description="serve.limits.TenantLimits")
    torch_threads: int | None = Field(None, ge=1)
    limits: Limits = Field(default_factory=Limits, description="request limits (serve.limits.Limits)")
    uploads: UploadConfig | None = Field(None, description="the upload API and its queue (serve.uploads); "
                                                           "absent: tenants cannot upload")

    def open_store(self):
        return open_store(self.store, **({"endpoint_url": self.s3_endpoint_url} if self.s3_endpoint_url else {}))


# -- errors in OpenAI's shape ---------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param
        self.headers = headers or {}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.type, self.param, self.code), self.status,
                            headers={**self.headers, **(headers or {})})


def _retry_after(seconds: float) -> dict:
    return {"Retry-After": str(max(1, int(-(-seconds // 1))))}


def _error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


api = FastAPI(title="Yo'LLaVA chat", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return exc.response({"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    return ApiError(400, f"invalid request: {first.get('msg', 'bad input')}",
                    param=".".join(str(p) for p in first.get("loc", ()))).response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, str(exc.detail), code=code).response()


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error")
    return ApiError(500, "internal error", "server_error", "internal_error").response()


_UNION_TAGS = ("text", "image_url")  # content-part tags pydantic puts in error locations


def _pydantic_message(err: ValidationError) -> tuple[str, str]:
    """The first error as (message, param), the param written `messages[0].content`."""
    e = max(err.errors(), key=lambda e: len(e["loc"]))  # the most specific, for unions
    parts = [p for p in e["loc"] if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "float"))]
    loc = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            loc += f"[{part}]"
        elif not (part in _UNION_TAGS and i and isinstance(parts[i - 1], int) and i + 1 < len(parts)):
            loc += f".{part}" if loc else part
    if e["type"] == "extra_forbidden":
        return f"unknown field {loc!r}", loc
    return f"{loc}: {e['msg'].removeprefix('Value error, ')}", loc


def parse_chat_request(body: bytes, limits: Limits) -> ChatCompletionRequest:
    """JSON -> a validated request, or ApiError 400 (nesting too deep included: json's RecursionError)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        check_raw(doc, limits)
        return ChatCompletionRequest.model_validate(doc)
    except RequestError as e:
        raise ApiError(e.status, str(e), code=e.code, param=e.param) from None
    except ValidationError as e:
        message, param = _pydantic_message(e)
        raise ApiError(400, message, param=param) from None


# -- the deployments --------------------------------------------------------------------------


@serve.deployment(name="ChatModel", max_ongoing_requests=128, ray_actor_options={"num_cpus": 1})
class ChatModel:
    """The shared base model, its concept cache and batch scheduler (one per replica)."""

    def __init__(self, args: AppArgs):
        set_torch_threads(args.torch_threads)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(args.model, args.dtype, device, seed=args.seed)
        self.metrics = ModelMetrics()
        self.labels = TenantLabels(args.max_tenant_labels)
        self.engine = ChatEngine(self.backbone, args.open_store(), cache_bytes=int(args.cache_mb * 2**20),
                                 revalidate_s=args.revalidate_s, max_batch_size=args.max_batch_size,
                                 max_rows_per_tenant=args.max_rows_per_tenant,
                                 max_prefill_tokens=args.max_prefill_tokens, kv_budget_tokens=args.kv_budget_tokens,
                                 admit_min_rows=args.admit_min_rows, admit_max_wait_steps=args.admit_max_wait_steps,
                                 tenant_limits=args.tenant_limits, store_threads=args.store_threads,
                                 store_timeout_s=args.store_timeout_s,
                                 on_cache_event=self.metrics.cache_event, on_step=self.metrics.batch,
                                 on_queue=self._queue_length)

    def _queue_length(self, tenant: str, n: int) -> None:
        # Several tenants may share the label `other`: it shows the last of them (a gauge cannot add).
        self.metrics.queue_length.set(n, tags={"tenant": self.labels(tenant)})

    async def chat(self, tenant: str, chat: Chat) -> AsyncIterator[dict]:
        outcome = "ok"
        label = self.labels(tenant)
        async for event in self.engine.chat(tenant, chat):
            kind = event["event"]
            if kind == "start":
                self.metrics.concepts_per_request.observe(len(event["concepts"]))
            elif kind == "end":
                self.metrics.prompt_tokens.inc(event["prompt_tokens"])
                self.metrics.tenant_tokens.inc(event["prompt_tokens"], tags={"tenant": label, "kind": "prompt"})
                if event["completion_tokens"]:
                    self.metrics.completion_tokens.inc(event["completion_tokens"])
                    self.metrics.tenant_tokens.inc(event["completion_tokens"],
                                                   tags={"tenant": label, "kind": "completion"})
            elif kind == "error":
                outcome = f"error_{event['status']}"
                if event["status"] == 429:
                    self.metrics.rejections.inc(tags={"tenant": label, "reason": "unknown_concepts"})
            yield event
        self.metrics.requests.inc(tags={"outcome": outcome})
        self.metrics.cache_bytes.set(self.engine.cache.nbytes)

    def info(self) -> dict:
        return {"model": self.backbone.model_id, "fingerprint": self.backbone.fingerprint,
                "device": str(self.backbone.device)}

    def photo_fit(self) -> PhotoFit:
        """How the ingress shrinks photos for this model (its image processor and tower size)."""
        return PhotoFit.for_backbone(self.backbone)

    def stats(self) -> dict:
        c = self.engine.cache
        return {**self.engine.scheduler.snapshot(), "cache": dict(c.stats.__dict__), "cache_bytes": c.nbytes,
                "cached": len(c)}

    def forget(self, owner: str, name: str) -> bool:
        """Drop a concept from this replica's cache (others revalidate within revalidate_s)."""
        return self.engine.cache.evict(owner, name)


@serve.deployment(name="UploadQueue", num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class UploadQueue:
    """The dispatcher of the upload queue (`cluster.queue`): one replica, a thread that looks at the
    queue every `poll_s` (at once when the ingress nudges it). Its state is the store's: a replica
    that restarts carries on. A look that fails on the store or the job API is logged and tried again;
    anything else ends the thread and fails the health check, so Serve restarts the replica."""

    def __init__(self, args: AppArgs):
        if args.uploads is None:
            raise ValueError("UploadQueue needs AppArgs.uploads")
        config = args.uploads.queue_config(args.model)
        env = {"AWS_ENDPOINT_URL_S3": args.s3_endpoint_url} if args.s3_endpoint_url else {}
        self.dispatcher = Dispatcher(args.open_store(), RayJobs(config.job_api), config, env=env)
        self.poll_s = config.poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.ticks = 0
        self._thread = threading.Thread(target=self._run, name="upload-queue", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # a nudge from now on wakes the next wait
            try:
                report = self.dispatcher.tick()
                if report.submitted or report.finished or report.removed:
                    log.info("upload queue: submitted %s, finished %s, removed %s", report.submitted,
                             report.finished, report.removed)
            except (OSError, JobApiError, *access_errors()) as e:  # the store or the job API: try again
                log.warning("upload queue: %r (trying again in %.0f s)", e, self.poll_s)
            except Exception as e:  # a bug: the health check fails and Serve restarts this replica
                log.exception("upload queue stopped")
                self._error = e
                return
            self.ticks += 1
            self._wake.wait(self.poll_s)

    def nudge(self) -> int:
        """Look now (an upload arrived); returns how many looks so far."""
        self._wake.set()
        return self.ticks

    def check_health(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise RuntimeError(f"the upload queue's thread stopped: {self._error!r}")

    def __del__(self):
        self._stop.set()
        self._wake.set()


@serve.deployment(name="ChatIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class ChatIngress:
    def __init__(self, model: DeploymentHandle, args: AppArgs, queue: DeploymentHandle | None = None):
        self.model, self.args, self.queue = model, args, queue
        self.uploads = args.uploads
        self._upload_locks: dict[str, asyncio.Lock] = {}
        self.model_id = args.model
        self.limits = args.limits
        self.keys = KeyRing(args.keys)
        self.store = args.open_store()
        self.sharing = Sharing(self.store)
        self.metrics = IngressMetrics()
        self.gate = TenantGate(args.tenant_limits)
        self.labels = TenantLabels(args.max_tenant_labels)
        self._photo_fit: PhotoFit | None = None

    # -- helpers

    def _tenant(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        tenant = self.keys.tenant(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")
        return tenant

    @staticmethod
    def _name(name: str, field: str = "name") -> str:
        if not NAME_RE.fullmatch(name):
            raise ApiError(404, f"no concept named {name[:80]!r}", code="concept_not_found", param=field)
        return name

    async def _body(self, request: Request, limit: int | None = None) -> bytes:
        limit = limit or self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request) -> ChatCompletionRequest:
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"content-type {ctype!r}: send application/json", code="unsupported_media_type")
        body = await self._body(request)
        return await asyncio.to_thread(parse_chat_request, body, self.limits)  # up to max_body_bytes: off the loop

    def _enter(self, tenant: str) -> Slot:
        try:
            return self.gate.enter(tenant)
        except Refused as e:
            self.metrics.rejections.inc(tags={"tenant": self.labels(tenant), "reason": e.reason})
            raise ApiError(429, str(e), code="rate_limit_exceeded",
                           headers={"Retry-After": e.retry_after_header}) from None

    async def _fit(self, req: ChatCompletionRequest) -> PhotoFit | None:
        """The model's PhotoFit, asked once, when the first photo arrives."""
        if not any(isinstance(m.content, list) and any(p.type == "image_url" for p in m.content)
                   for m in req.messages):
            return None
        if self._photo_fit is None:
            self._photo_fit = await self.model.photo_fit.remote()
        return self._photo_fit

    # -- routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        # Readiness only: which model or where it lives is nobody's business without a key.
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._tenant(request)
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "yollava"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()
        tenant = self._tenant(request)
        slot = self._enter(tenant)  # before reading the body: a refused request costs nothing more
        streaming = False
        try:
            req = await self._parse(request)
            if req.model != self.model_id:
                raise ApiError(404, f"model {req.model[:100]!r} does not exist; this server has {self.model_id!r}",
                               code="model_not_found", param="model")
            fit = await self._fit(req)
            try:
                chat = await asyncio.to_thread(to_chat, req, self.limits, fit)  # photos decode off the loop
            except RequestError as e:
                raise ApiError(e.status, str(e), code=e.code, param=e.param) from None
            events = self.model.options(stream=True).chat.remote(tenant, chat)
            try:
                first = await events.__anext__()
            except BackPressureError:
                self.metrics.rejections.inc(tags={"tenant": self.labels(tenant), "reason": "overloaded"})
                raise ApiError(503, "the model is overloaded (its queue is full); retry shortly", "server_error",
                               "overloaded", headers=_retry_after(1)) from None
            if first["event"] == "error":
                retry = first.get("retry_after")
                raise ApiError(first["status"], first["message"], _error_type(first["status"]), first["code"],
                               first["param"], headers=_retry_after(retry) if retry is not None else None)
            headers = {"x-concepts-used": ",".join(first["concepts"])}
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                body = self._sse(chat, first, events, include_usage, slot)
                weakref.finalize(body, slot.release)  # a stream never started is still given back
                streaming = True
                return StreamingResponse(body, headers=headers, media_type="text/event-stream")
            text, end = [], None
            async for ev in events:
                if ev["event"] == "delta":
                    text.append(ev["text"])
                elif ev["event"] == "end":
                    end = ev
                elif ev["event"] == "error":
                    raise ApiError(ev["status"], ev["message"], "server_error", ev["code"])
            self.metrics.latency.observe((time.perf_counter() - t0) * 1000, tags={"route": "chat"})
            return JSONResponse(completion_body(chat, self.model_id, "".join(text), end["finish_reason"],
                                                end["prompt_tokens"], end["completion_tokens"]), headers=headers)
        finally:
            if not streaming:
                slot.release()

    async def _sse(self, chat: Chat, first: dict, events, include_usage: bool, slot: Slot) -> AsyncIterator[str]:
        def data(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            yield data(chunk_body(chat, self.model_id, {"role": "assistant", "content": ""}))
            async for ev in events:
                if ev["event"] == "delta":
                    yield data(chunk_body(chat, self.model_id, {"content": ev["text"]}))
                elif ev["event"] == "end":
                    yield data(chunk_body(chat, self.model_id, {}, ev["finish_reason"]))
                    if include_usage:
                        yield data(chunk_body(chat, self.model_id, {}, usage_=usage(
                            ev["prompt_tokens"], ev["completion_tokens"]), choices=False))
                elif ev["event"] == "error":
                    yield data(error_body(ev["message"], "server_error", None, ev["code"]))
            yield "data: [DONE]\n\n"
        finally:
            slot.release()

    @api.get("/v1/concepts")
    async def list_concepts(self, request: Request) -> dict:
        tenant = self._tenant(request)

        def listing() -> list[dict]:
            own = [{**c, "shared_with": self.sharing.grantees(tenant, c["name"]) if c["version"] else []}
                   for c in tenant_statuses(self.store, tenant)]
            shared = []
            for owner, name in self.sharing.shared_with(tenant):
                version = self.store.latest_version(owner, name)
                if version is not None:
                    shared.append({"id": f"{owner}/{name}", "owner": owner, "name": name, "status": "ready",
                                   "version": version, "object": "concept", "shared_with": None})
            return own + shared

        return {"object": "list", "data": await asyncio.to_thread(listing)}

    @api.delete("/v1/concepts/{name}")
    async def delete_concept(self, name: str, request: Request) -> dict:
        tenant = self._tenant(request)
        self._name(name)

        def delete() -> bool:
            # A queued upload discarded first, then grants, versions, done-markers, job records and
            # uploads (cluster.lifecycle); refused while a batch has the upload (its job may be writing).
            try:
                report = forget_concept(self.store, tenant, name)
            except ConceptBusy:
                raise ApiError(409, f"concept {name!r} is training; delete it once it is ready or failed",
                               code="concept_busy", param="name") from None
            return bool(report["versions"] or report["uploads"])

        if not await asyncio.to_thread(delete):
            raise ApiError(404, f"no concept named {name!r}", code="concept_not_found", param="name")
        try:
            await self.model.forget.remote(tenant, name)
        except (RayError, RayServeException) as e:  # the other replicas revalidate within revalidate_s anyway
            log.warning("could not evict %s/%s from a model replica: %r", tenant, name, e)
        return {"id": name, "object": "concept.deleted", "deleted": True}

    @api.get("/v1/concepts/{name}")
    async def get_concept(self, name: str, request: Request) -> dict:
        tenant = self._tenant(request)
        self._name(name)

        def status() -> dict | None:
            body = concept_status(self.store, tenant, name)
            if body is not None:
                body["shared_with"] = self.sharing.grantees(tenant, name) if body["version"] else []
            return body

        body = await asyncio.to_thread(status)
        if body is None:
            raise ApiError(404, f"no concept named {name!r}", code="concept_not_found", param="name")
        return body

    @api.post("/v1/concepts", status_code=202)
    async def upload_concept(self, request: Request):
        tenant = self._tenant(request)
        if self.uploads is None:
            raise ApiError(404, "uploads are not enabled on this service; an operator trains concepts "
                                "(cluster.personalize)", code="uploads_disabled")
        slot = self._enter(tenant)
        try:
            raw = await self._read_upload(request)
            lock = self._upload_locks.setdefault(tenant, asyncio.Lock())
            async with lock:  # one upload of a tenant at a time here: the quotas count what is stored
                try:
                    body = await asyncio.to_thread(self._store_upload, tenant, raw)
                except UploadError as e:
                    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
                    raise ApiError(e.status, str(e), code=e.code, param=e.param, headers=headers) from None
        finally:
            slot.release()
        if self.queue is not None:
            try:
                await self.queue.nudge.remote()
            except (RayError, RayServeException) as e:  # it looks every poll_s anyway
                log.warning("could not nudge the upload queue: %r", e)
        return JSONResponse(body, status_code=202)

    def _store_upload(self, tenant: str, raw: RawUpload) -> dict:
        limits = self.uploads.limits
        name = check_upload_name(raw.name)
        description = check_description(raw.description, limits)
        check_quotas(self.store, tenant, name, limits)  # before decoding: a refused upload costs little
        photos = prepare_photos(raw, limits, self.limits.image)
        commit_upload(self.store, tenant, name, description, photos)
        return concept_status(self.store, tenant, name)

    async def _read_upload(self, request: Request) -> RawUpload:
        limits = self.uploads.limits
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            body = await self._body(request, limits.max_body_bytes)
            try:
                return await asyncio.to_thread(parse_json_upload, body)
            except UploadError as e:
                raise ApiError(e.status, str(e), code=e.code, param=e.param) from None
        if ctype != "multipart/form-data":
            raise ApiError(415, f"content-type {ctype!r}: send multipart/form-data (fields name, description, "
                                "files photos) or application/json", code="unsupported_media_type")
        return await self._read_form(request, limits.max_body_bytes)

    async def _read_form(self, request: Request, limit: int) -> RawUpload:
        """multipart/form-data through Starlette's parser (python-multipart), the body capped as it streams."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        seen = 0
        receive = request.receive

        async def capped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
            return message

        # Files are counted by the photo quota (403, like JSON), the body by `limit`; text fields are few and short.
        form = await Request(request.scope, capped).form(max_files=1000, max_fields=8, max_part_size=64 * 1024)
        try:
            fields = {k for k in form.keys()}
            unknown = fields - {"name", "description", "photos"}
            if unknown:
                raise ApiError(400, f"unknown form field {sorted(unknown)[0][:80]!r}", param=sorted(unknown)[0][:80])
            names = form.getlist("name")
            if len(names) != 1 or not isinstance(names[0], str):
                raise ApiError(400, "the form needs one text field `name`", code="invalid_name", param="name")
            descriptions = form.getlist("description")
            if len(descriptions) > 1 or any(not isinstance(d, str) for d in descriptions):
                raise ApiError(400, "at most one text field `description`", param="description")
            photos = []
            for i, f in enumerate(form.getlist("photos")):
                if isinstance(f, str):
                    raise ApiError(400, f"photos[{i}] is a text field; send files", code="invalid_image",
                                   param=f"photos[{i}]")
                data = await f.read(self.limits.max_image_bytes + 1)
                label = f"photos[{i}] ({(f.filename or '')[:80]!r})"
                if len(data) > self.limits.max_image_bytes:
                    raise ApiError(400, f"{label}: image is larger than {self.limits.max_image_bytes} bytes",
                                   code="invalid_image", param=f"photos[{i}]")
                photos.append((label, data))
            return RawUpload(names[0], descriptions[0] if descriptions else None, photos)
        finally:
            await form.close()

    @api.get("/v1/limits")
    async def upload_limits(self, request: Request) -> dict:
        """What the page checks before sending anything (the service checks again)."""
        self._tenant(request)
        lim = self.limits
        body = {"object": "limits", "model": self.model_id,
                "chat": {"max_images": lim.max_images, "max_image_bytes": lim.max_image_bytes,
                         "max_image_pixels": lim.max_image_pixels, "max_tokens": lim.max_tokens,
                         "formats": image_formats()},
                "uploads": None}
        if self.uploads is not None:
            body["uploads"] = {**self.uploads.limits.model_dump(exclude={"retry_after_s"}),
                               "max_image_bytes": lim.max_image_bytes, "max_image_pixels": lim.max_image_pixels,
                               "formats": image_formats()}
        return body

    # -- the web page

    @api.get("/")
    async def page(self):
        return self._static("index.html")

    @api.get("/static/{file}")
    async def static(self, file: str):
        return self._static(file)

    def _static(self, file: str):
        path = STATIC_FILES.get(file)
        if path is None:
            raise ApiError(404, f"no file {file[:80]!r}", code="not_found")
        return FileResponse(path, media_type=_MEDIA.get(path.suffix, "application/octet-stream"),
                            headers=PAGE_HEADERS)

    @api.get("/v1/concepts/{name}/shares")
    async def list_shares(self, name: str, request: Request) -> dict:
        tenant = self._tenant(request)
        await self._own(tenant, self._name(name))
        tenants = await asyncio.to_thread(self.sharing.grantees, tenant, name)
        return {"object": "list", "concept": name, "data": tenants}

    @api.put("/v1/concepts/{name}/shares/{grantee}")
    async def share(self, name: str, grantee: str, request: Request) -> dict:
        tenant = self._tenant(request)
        await self._own(tenant, self._name(name))
        if not NAME_RE.fullmatch(grantee) or grantee == tenant:
            raise ApiError(400, f"cannot share with {grantee[:80]!r}", param="tenant")
        try:
            changed = await asyncio.to_thread(self.sharing.share, tenant, name, grantee)
        except ConceptNotFound:  # deleted while being shared: the grant was taken back
            raise ApiError(404, f"no concept named {name!r}", code="concept_not_found", param="name") from None
        return {"concept": name, "tenant": grantee, "shared": True, "changed": changed}

    @api.delete("/v1/concepts/{name}/shares/{grantee}")
    async def unshare(self, name: str, grantee: str, request: Request) -> dict:
        tenant = self._tenant(request)
        await self._own(tenant, self._name(name))
        if not NAME_RE.fullmatch(grantee):
            raise ApiError(400, f"cannot unshare with {grantee[:80]!r}", param="tenant")
        changed = await asyncio.to_thread(self.sharing.unshare, tenant, name, grantee)
        return {"concept": name, "tenant": grantee, "shared": False, "changed": changed}

    async def _own(self, tenant: str, name: str) -> None:
        if await asyncio.to_thread(self.store.latest_version, tenant, name) is None:
            raise ApiError(404, f"no concept named {name!r}", code="concept_not_found", param="name")


def build_app(args: AppArgs) -> serve.Application:
    """The application: `serve run serve.app:build_app store=URI model=ID keys=FILE`."""
    queue = UploadQueue.bind(args) if args.uploads is not None else None
    return ChatIngress.bind(ChatModel.bind(args), args, queue)
