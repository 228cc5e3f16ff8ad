"""The model side: concepts resolved per request, requests of all tenants decoded in shared batches.

`BatchScheduler` collects requests for up to `batch_wait_s` after the first
arrives (or until `max_batch_size`), decodes them in one `Generator.generate`
call on a worker thread, and streams each row's text through its own queue.
Requests arriving while a batch decodes form the next one. Greedy answers do
not depend on the batch (the generator's batched == one-by-one invariant).
A batch that fails as a whole is retried one request at a time, so one bad
request cannot sink the others.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from cluster.store import ArtifactStore, access_errors
from yollava.backbone import Backbone
from yollava.concept_model import ConceptRows
from yollava.generate import GenerationRequest, GenerationResult, Generator, SamplingParams

from serve.concepts import ConceptBroken, ConceptCache, ConceptResolver, Sharing
from serve.schemas import Chat

log = logging.getLogger(__name__)


class GenerationFailed(RuntimeError):
    """Generation of a request failed (logged where it did); the model's error is the `__cause__`."""


def _failed(error: Exception) -> GenerationFailed:
    failed = GenerationFailed(f"generation failed: {error!r}")
    failed.__cause__ = error
    return failed


@dataclass
class _Job:
    request: GenerationRequest
    queue: asyncio.Queue
    arrived: float
    cancelled: bool = False


@dataclass
class SchedulerStats:
    batches: int = 0
    rows: int = 0
    max_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the last 1000


class BatchScheduler:
    def __init__(self, generator: Generator, max_batch_size: int = 32, batch_wait_s: float = 0.005,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch_size < 1 or batch_wait_s < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1, batch_wait_s={batch_wait_s} >= 0")
        self.generator = generator
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.on_batch = on_batch or (lambda n: None)
        self.stats = SchedulerStats()
        self._pending: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[tuple[str, object]]:
        """Yield ("delta", text)... then ("done", GenerationResult); raises what generation raised."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._pending = asyncio.Queue()
            self._task = loop.create_task(self._run())
        job = _Job(request, asyncio.Queue(), loop.time())
        self._pending.put_nowait(job)
        try:
            while True:
                kind, value = await job.queue.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            job.cancelled = True

    async def _collect(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        batch = [await self._pending.get()]
        deadline = batch[0].arrived + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            if not self._pending.empty():
                batch.append(self._pending.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._pending.get(), remaining))
            except (asyncio.TimeoutError, TimeoutError):
                break
        return [j for j in batch if not j.cancelled]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self._count(len(batch))
            # Whatever the model raises fails its requests, never the scheduler: broad on purpose.
            try:
                await self._decode(loop, batch)
            except Exception as e:
                if len(batch) == 1:
                    log.exception("generation failed")
                    batch[0].queue.put_nowait(("error", _failed(e)))
                    continue
                log.exception("a batch of %d failed; retrying its requests one by one", len(batch))
                for job in batch:
                    try:
                        await self._decode(loop, [job])
                    except Exception as row_error:
                        log.exception("generation failed")
                        job.queue.put_nowait(("error", _failed(row_error)))

    async def _decode(self, loop, batch: list[_Job]) -> None:
        def on_delta(i: int, text: str) -> None:
            loop.call_soon_threadsafe(batch[i].queue.put_nowait, ("delta", text))

        results = await asyncio.to_thread(self.generator.generate, [j.request for j in batch], on_delta)
        for job, res in zip(batch, results):
            job.queue.put_nowait(("done", res))  # after every delta: call_soon_threadsafe ran first

    def _count(self, n: int) -> None:
        s = self.stats
        s.batches, s.rows, s.max_batch = s.batches + 1, s.rows + n, max(s.max_batch, n)
        s.batch_sizes = (s.batch_sizes + [n])[-1000:]
        self.on_batch(n)


class ChatError(Exception):
    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def event(self) -> dict:
        return {"event": "error", "status": self.status, "message": str(self), "code": self.code,
                "param": self.param}


class ChatEngine:
    """Backbone + concept cache + scheduler: `chat(tenant, Chat)` yields event dicts.

    Events: `start` (concepts used, prompt tokens), `delta` (text), `end`
    (finish reason, token counts), or a single `error` first.
    """

    def __init__(self, backbone: Backbone, store: ArtifactStore, *, cache_bytes: int = 256 * 2**20,
                 revalidate_s: float = 1.0, max_batch_size: int = 32, batch_wait_s: float = 0.005,
                 on_cache_event: Callable[[str], None] | None = None,
                 on_batch: Callable[[int], None] | None = None):
        self.context_length = context_length(backbone.config)  # first: a model without one fails at once
        self.backbone = backbone
        self.generator = Generator(backbone)
        self.cache = ConceptCache(store, backbone.fingerprint, cache_bytes, revalidate_s,
                                  on_event=on_cache_event)
        self.resolver = ConceptResolver(self.cache, Sharing(store), revalidate_s)
        self.scheduler = BatchScheduler(self.generator, max_batch_size, batch_wait_s, on_batch)

    async def chat(self, tenant: str, chat: Chat) -> AsyncIterator[dict]:
        try:
            request, prompt_tokens = await self._prepare(tenant, chat)
        except ChatError as e:
            log.info("request %s of %s refused (%d): %s", chat.request_id, tenant, e.status, e)
            yield e.event()
            return
        yield {"event": "start", "prompt_tokens": prompt_tokens,
               "concepts": [c.tokens.identifier for c in request.concepts]}
        try:
            async for kind, value in self.scheduler.stream(request):
                if kind == "delta":
                    yield {"event": "delta", "text": value}
                else:
                    res: GenerationResult = value
                    yield {"event": "end", "finish_reason": res.finish_reason,
                           "prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids)}
        except GenerationFailed as e:
            log.error("request %s of %s: %s", chat.request_id, tenant, e)
            yield ChatError("the model failed to answer this request", 500, "internal_error").event()

    async def _prepare(self, tenant: str, chat: Chat) -> tuple[GenerationRequest, int]:
        concepts = await self._resolve(tenant, chat.refs)
        try:
            params = SamplingParams(chat.max_tokens, chat.temperature, chat.top_p, chat.stop, chat.seed)
            request = GenerationRequest(chat.messages, concepts, chat.images, params)
            n = len(self.generator.encode(request))
        except ValueError as e:
            raise ChatError(str(e)) from None
        if n + chat.max_tokens > self.context_length:
            raise ChatError(f"the prompt has {n} tokens; with max_tokens={chat.max_tokens} that exceeds "
                            f"the model's context of {self.context_length}", 400,
                            "context_length_exceeded", "messages")
        return request, n

    async def _resolve(self, tenant: str, refs: list[str]) -> list[ConceptRows]:
        """The concepts of `refs`; a ChatError naming the ref as typed, nothing from inside the store.

        A broken artifact is a 500 (retrying will not help); a store that cannot answer (FileStore's
        OSError, the S3 backend's `access_errors`) a 503. Anything else is a bug and propagates.
        """
        try:
            return await self.resolver.resolve(tenant, refs)
        except ConceptBroken as e:
            log.error("tenant %s: %s", tenant, e, exc_info=True)
            raise ChatError(f"concept <{e.ref}> failed its integrity check when loaded (a damaged artifact, "
                            "or one made for another base model); it cannot be used until it is stored again",
                            500, "concept_integrity_failed", "messages") from None
        except (OSError, *access_errors()):  # the store cannot answer now: the request may succeed later
            log.warning("resolving concepts %s of %s failed: the store did not answer", refs, tenant,
                        exc_info=True)
            raise ChatError("a concept named in the request could not be loaded; retry later", 503,
                            "concept_unavailable", "messages") from None


def context_length(config) -> int:
    """The model's context in tokens: `max_position_embeddings` of its text config (LLaVA's
    `text_config`, else the config itself); ValueError if the config does not give it."""
    text = getattr(config, "text_config", None)
    if text is None:
        text = config
    n = getattr(text, "max_position_embeddings", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the model config ({type(text).__name__}) has max_position_embeddings={n!r}: "
                         "cannot tell the model's context length")
    return n


def set_torch_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(max(1, int(n)))
