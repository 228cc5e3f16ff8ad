"""The Ray Serve application: a FastAPI ingress (auth, validation, concepts API) and the model.

    serve run serve.app:build_app store=s3://bucket/prefix model=mini keys=keys.json
    serve deploy serve/config.yaml
    python -m serve --store file:///tmp/store        # one machine, demo keys printed

`ChatIngress` authenticates, validates and decodes photos (so nothing bad
reaches the model), and owns the concept listing/sharing API. `ChatModel`
holds the base model, the concept cache and the batch scheduler; every
replica can serve every tenant's concepts.
"""


import asyncio
import json
import logging
import time
from typing import AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.store import open_store
from yollava.backbone import load_backbone
from yollava.tokens import NAME_RE

from serve.concepts import Sharing
from serve.engine import ChatEngine, set_torch_threads
from serve.keys import KeyRing
from serve.limits import Limits, to_chat
from serve.metrics import IngressMetrics, ModelMetrics
from serve.schemas import (Chat, ChatCompletionRequest, RequestError, chunk_body, completion_body,
                           error_body, usage)

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
    max_batch_size: int = Field(32, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    limits: Limits = Field(default_factory=Limits, description="request limits (serve.limits.Limits)")

    def open_store(self):
        return open_store(self.store, **({"endpoint_url": self.s3_endpoint_url} if self.s3_endpoint_url else {}))


# -- errors in OpenAI's shape ---------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.type, self.param, self.code), self.status, headers=headers)


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
        self.engine = ChatEngine(self.backbone, args.open_store(), cache_bytes=int(args.cache_mb * 2**20),
                                 revalidate_s=args.revalidate_s, max_batch_size=args.max_batch_size,
                                 batch_wait_s=args.batch_wait_ms / 1000,
                                 on_cache_event=self.metrics.cache_event, on_batch=self.metrics.batch)

    async def chat(self, tenant: str, chat: Chat) -> AsyncIterator[dict]:
        outcome = "ok"
        async for event in self.engine.chat(tenant, chat):
            kind = event["event"]
            if kind == "start":
                self.metrics.concepts_per_request.observe(len(event["concepts"]))
            elif kind == "end":
                self.metrics.prompt_tokens.inc(event["prompt_tokens"])
                if event["completion_tokens"]:
                    self.metrics.completion_tokens.inc(event["completion_tokens"])
            elif kind == "error":
                outcome = f"error_{event['status']}"
            yield event
        self.metrics.requests.inc(tags={"outcome": outcome})
        self.metrics.cache_bytes.set(self.engine.cache.nbytes)

    def info(self) -> dict:
        return {"model": self.backbone.model_id, "fingerprint": self.backbone.fingerprint,
                "device": str(self.backbone.device)}

    def stats(self) -> dict:
        s, c = self.engine.scheduler.stats, self.engine.cache
        return {"batches": s.batches, "rows": s.rows, "max_batch": s.max_batch,
                "batch_sizes": list(s.batch_sizes), "cache": dict(c.stats.__dict__),
                "cache_bytes": c.nbytes, "cached": len(c)}

    def forget(self, owner: str, name: str) -> bool:
        """Drop a concept from this replica's cache (others revalidate within revalidate_s)."""
        return self.engine.cache.evict(owner, name)


@serve.deployment(name="ChatIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class ChatIngress:
    def __init__(self, model: DeploymentHandle, args: AppArgs):
        self.model, self.args = model, args
        self.model_id = args.model
        self.limits = args.limits
        self.keys = KeyRing(args.keys)
        self.store = args.open_store()
        self.sharing = Sharing(self.store)
        self.metrics = IngressMetrics()

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

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
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
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"malformed JSON: {e}", code="invalid_json") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return ChatCompletionRequest.model_validate(doc)
        except ValidationError as e:
            message, param = _pydantic_message(e)
            raise ApiError(400, message, param=param) from None

    # -- routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._tenant(request)
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "yollava"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()
        tenant = self._tenant(request)
        req = await self._parse(request)
        if req.model != self.model_id:
            raise ApiError(404, f"model {req.model[:100]!r} does not exist; this server has {self.model_id!r}",
                           code="model_not_found", param="model")
        try:
            chat = await asyncio.to_thread(to_chat, req, self.limits)  # photos decode off the loop
        except RequestError as e:
            raise ApiError(e.status, str(e), code=e.code, param=e.param) from None
        events = self.model.options(stream=True).chat.remote(tenant, chat)
        first = await events.__anext__()
        if first["event"] == "error":
            raise ApiError(first["status"], first["message"], _error_type(first["status"]), first["code"],
                           first["param"])
        headers = {"x-concepts-used": ",".join(first["concepts"])}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(chat, first, events, include_usage), headers=headers,
                                     media_type="text/event-stream")
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

    async def _sse(self, chat: Chat, first: dict, events, include_usage: bool) -> AsyncIterator[str]:
        def data(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

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

    @api.get("/v1/concepts")
    async def list_concepts(self, request: Request) -> dict:
        tenant = self._tenant(request)

        def listing() -> list[dict]:
            own = [{"id": r.name, "owner": r.owner, "name": r.name, "version": r.version,
                    "object": "concept", "shared_with": self.sharing.grantees(r.owner, r.name)}
                   for r in self.store.list_concepts(tenant)]
            shared = []
            for owner, name in self.sharing.shared_with(tenant):
                version = self.store.latest_version(owner, name)
                if version is not None:
                    shared.append({"id": f"{owner}/{name}", "owner": owner, "name": name,
                                   "version": version, "object": "concept", "shared_with": None})
            return own + shared

        return {"object": "list", "data": await asyncio.to_thread(listing)}

    @api.delete("/v1/concepts/{name}")
    async def delete_concept(self, name: str, request: Request) -> dict:
        tenant = self._tenant(request)
        self._name(name)

        def delete() -> list[int]:
            deleted = self.store.delete_concept(tenant, name)
            if deleted:
                self.sharing.drop(tenant, name)
            return deleted

        if not await asyncio.to_thread(delete):
            raise ApiError(404, f"no concept named {name!r}", code="concept_not_found", param="name")
        try:
            await self.model.forget.remote(tenant, name)
        except (RayError, RayServeException) as e:  # the other replicas revalidate within revalidate_s anyway
            log.warning("could not evict %s/%s from a model replica: %r", tenant, name, e)
        return {"id": name, "object": "concept.deleted", "deleted": True}

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
        changed = await asyncio.to_thread(self.sharing.share, tenant, name, grantee)
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
    return ChatIngress.bind(ChatModel.bind(args), args)
