"""The model side: concepts resolved per request, requests of all tenants decoded together.

`Scheduler` is continuous batching over `yollava.generate.Decoder`, driven by
one decode thread: every iteration it admits waiting requests (tenants take
turns), prefills them, steps every live row by one token and delivers each
row's new text to its own asyncio queue. A request joins at the next step and
leaves when it ends, fails or its client goes away (its stream is closed:
the row is retired at the next step). Admission is bounded by the batch cap,
a per-tenant share of the batch (so others always find a place), a prefill
budget per step, and a KV budget in tokens: the padded cache the batch can
reach (rows x the longest prompt + max_tokens) never exceeds it, so memory is
refused at admission, never by a crash mid-batch. A row that fails fails
alone (the decoder isolates it); text already delivered is never sent again.
A request's answer does not depend on the batch (the decoder's invariant).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from cluster.store import ArtifactStore, access_errors
from yollava.backbone import Backbone
from yollava.concept_model import ConceptRows
from yollava.generate import GenerationRequest, GenerationResult, Generator, SamplingParams
from yollava.prompt import Encoded

from serve.concepts import ConceptBroken, ConceptCache, ConceptResolver, Sharing, split_ref
from serve.limits import TenantLimits, TokenBucket
from serve.schemas import Chat

log = logging.getLogger(__name__)


class GenerationFailed(RuntimeError):
    """Generation of a request failed (logged where it did); the model's error is the `__cause__`."""


def _failed(error: Exception) -> GenerationFailed:
    failed = GenerationFailed(f"generation failed: {error!r}")
    failed.__cause__ = error
    return failed


@dataclass(eq=False)
class _Job:
    key: int
    tenant: str
    request: GenerationRequest
    encoded: Encoded | None
    reserve: int  # prompt + max_new_tokens: the most cache this row can hold
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    submitted_step: int
    cancelled: bool = False
    ended: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded) if self.encoded is not None else self.reserve - self.request.params.max_new_tokens


@dataclass
class SchedulerStats:
    steps: int = 0
    rows: int = 0  # requests admitted
    max_batch: int = 0
    failed: int = 0
    cancelled: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))  # rows per step, the last 1000
    admissions: deque = field(default_factory=lambda: deque(maxlen=1000))  # (tenant, steps waited, s waited)


class Scheduler:
    """Continuous batching of `generator`'s requests, tenants taking turns at admission."""

    def __init__(self, generator: Generator, *, max_batch_size: int = 32, max_rows_per_tenant: int | None = None,
                 max_prefill_tokens: int = 4096, kv_budget_tokens: int = 65536, idle_exit_s: float = 5.0,
                 admit_min_rows: int | None = None, admit_max_wait_steps: int = 8,
                 on_queue: Callable[[str, int], None] | None = None,
                 on_step: Callable[[int], None] | None = None):
        rows_cap = max_rows_per_tenant if max_rows_per_tenant is not None else max(1, max_batch_size // 2)
        admit_min = admit_min_rows if admit_min_rows is not None else max(1, max_batch_size // 8)
        for name, value in (("max_batch_size", max_batch_size), ("max_rows_per_tenant", rows_cap),
                            ("max_prefill_tokens", max_prefill_tokens), ("kv_budget_tokens", kv_budget_tokens),
                            ("admit_min_rows", admit_min)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if admit_min > max_batch_size:
            raise ValueError(f"admit_min_rows={admit_min} must be at most max_batch_size={max_batch_size}")
        if admit_max_wait_steps < 0:
            raise ValueError(f"admit_max_wait_steps={admit_max_wait_steps} must be >= 0")
        self.generator = generator
        self.max_batch_size, self.max_rows_per_tenant = max_batch_size, rows_cap
        self.max_prefill_tokens, self.kv_budget_tokens = max_prefill_tokens, kv_budget_tokens
        self.idle_exit_s = idle_exit_s
        self.admit_min_rows, self.admit_max_wait_steps = admit_min, admit_max_wait_steps
        self._deferred = 0  # steps run while requests waited for rows that were free
        self.on_queue = on_queue or (lambda tenant, n: None)
        self.on_step = on_step or (lambda n: None)
        self.stats = SchedulerStats()
        self.decoder = generator.decoder()  # only the decode thread touches it
        self._cv = threading.Condition()
        self._waiting: OrderedDict[str, deque[_Job]] = OrderedDict()  # per tenant, in turn order
        self._running: dict[int, _Job] = {}
        self._rows: Counter[str] = Counter()  # rows in the batch per tenant
        self._keys = itertools.count()
        self._step = 0
        self._thread: threading.Thread | None = None
        self._outbox = _Outbox()

    # -- the event loop's side

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ValueError if a request could never be admitted (its cache alone exceeds the KV budget)."""
        need = prompt_tokens + max_new_tokens
        if need > self.kv_budget_tokens:
            raise ValueError(f"the prompt has {prompt_tokens} tokens; with max_tokens={max_new_tokens} its cache "
                             f"needs {need} tokens, more than this server's KV budget of {self.kv_budget_tokens}")

    def snapshot(self) -> dict:
        """The stats, copied under the lock (the decode thread updates them)."""
        with self._cv:
            s = self.stats
            return {"steps": s.steps, "rows": s.rows, "max_batch": s.max_batch, "failed": s.failed,
                    "cancelled": s.cancelled, "batch_sizes": list(s.batch_sizes),
                    "admissions": [list(a) for a in s.admissions],
                    "waiting": sum(len(q) for q in self._waiting.values()), "running": len(self._running)}

    def waiting(self, tenant: str | None = None) -> int:
        with self._cv:
            if tenant is not None:
                return len(self._waiting.get(tenant, ()))
            return sum(len(q) for q in self._waiting.values())

    async def stream(self, request: GenerationRequest, tenant: str = "-",
                     encoded: Encoded | None = None) -> AsyncIterator[tuple[str, object]]:
        """Yield ("delta", text)... then ("done", GenerationResult); raises GenerationFailed if the
        request failed. Closing the stream early cancels the request (retired at the next step)."""
        loop = asyncio.get_running_loop()
        prompt = len(encoded) if encoded is not None else len(self.generator.encode(request))
        self.check(prompt, request.params.max_new_tokens)
        job = _Job(next(self._keys), tenant, request, encoded, prompt + request.params.max_new_tokens, loop,
                   asyncio.Queue(), time.monotonic(), 0)
        self._submit(job)
        try:
            pending = None
            while True:
                kind, value = pending or await job.queue.get()
                pending = None
                while kind == "delta" and not job.queue.empty():  # a slow reader gets one piece, not many
                    pending = job.queue.get_nowait()
                    if pending[0] != "delta":
                        break
                    value, pending = value + pending[1], None
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            if not job.ended:
                self._cancel(job)

    def _submit(self, job: _Job) -> None:
        with self._cv:
            job.submitted_step = self._step
            self._waiting.setdefault(job.tenant, deque()).append(job)
            n = len(self._waiting[job.tenant])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
                self._thread.start()
            self._cv.notify()
        self.on_queue(job.tenant, n)

    def _cancel(self, job: _Job) -> None:
        with self._cv:
            job.cancelled = True
            q = self._waiting.get(job.tenant)
            if q is not None and job in q:  # not admitted yet: it just leaves the queue
                q.remove(job)
                job.ended = True
                self.stats.cancelled += 1
                n = len(q)
            else:
                n = None  # running: the decode thread retires it at its next step
        if n is not None:
            self.on_queue(job.tenant, n)

    # -- the decode thread

    def _run(self) -> None:
        while True:
            with self._cv:
                self._retire_cancelled()
                newcomers = self._admit_from_queues() if self._admission_due() else []
                if not newcomers and not len(self.decoder):
                    if not self._cv.wait_for(self._has_waiting, timeout=self.idle_exit_s):
                        self._thread = None  # idle: the next request starts a new thread
                        return
                    continue
                self._step += 1
            # Whatever goes wrong outside the decoder's own row isolation is a bug: it fails every
            # request in the scheduler (each gets the error, the log has it) and the scheduler goes on.
            try:
                self._iterate(newcomers)
            except Exception as e:
                log.exception("the decode loop failed; failing its %d requests", len(self._running))
                self._fail_everything(e)

    def _has_waiting(self) -> bool:
        return any(self._waiting.values())

    def _admission_due(self) -> bool:
        """Under the lock: admit now, or let a few more rows free up first, so that one prefill
        (one pass of the model) admits several requests instead of one pass per freed row. Due when
        the batch is empty, when `admit_min_rows` rows are free, or once requests have waited
        `admit_max_wait_steps` steps for free rows."""
        live = len(self.decoder)
        free = self.max_batch_size - live
        if not live or free >= self.admit_min_rows:
            self._deferred = 0
            return True
        if free < 1 or not self._has_waiting():
            self._deferred = 0
            return False
        if self._deferred >= self.admit_max_wait_steps:
            self._deferred = 0
            return True
        self._deferred += 1
        return False

    def _iterate(self, newcomers: list[_Job]) -> None:
        events = []
        if newcomers:
            events += self.decoder.admit({j.key: j.request for j in newcomers},
                                         {j.key: j.encoded for j in newcomers if j.encoded is not None})
            for j in newcomers:
                j.request = None  # the decoder holds what it needs
        if len(self.decoder):
            n = len(self.decoder)
            events += self.decoder.step()
            with self._cv:  # (stats are read from the event loop: see `snapshot`)
                s = self.stats
                s.steps += 1
                s.max_batch = max(s.max_batch, n)
                s.batch_sizes.append(n)
            self.on_step(n)
        self._deliver(events)

    def _admit_from_queues(self) -> list[_Job]:
        """Under the lock: the next newcomers, tenants in turn (round robin; a tenant that got one
        goes to the back), each tenant's own requests first come first served."""
        picked: list[_Job] = []
        reserves: list[int] = []
        live, prefill = len(self.decoder), 0
        while live + len(picked) < self.max_batch_size:
            for tenant in list(self._waiting):
                q = self._waiting[tenant]
                if not q:
                    del self._waiting[tenant]
                    continue
                if self._rows[tenant] >= self.max_rows_per_tenant:
                    continue  # its share of the batch is full: others go first
                job = q[0]
                if picked and prefill + job.prompt_tokens > self.max_prefill_tokens:
                    return picked  # enough prefill for one step
                if self.decoder.kv_bound(reserves + [job.reserve]) > self.kv_budget_tokens:
                    return picked  # waits for rows to leave (and nobody jumps ahead of it)
                q.popleft()
                self._waiting.move_to_end(tenant)
                picked.append(job)
                reserves.append(job.reserve)
                prefill += job.prompt_tokens
                self._rows[tenant] += 1
                self._running[job.key] = job
                now = time.monotonic()
                self.stats.rows += 1
                self.stats.admissions.append((tenant, self._step + 1 - job.submitted_step, now - job.submitted))
                self.on_queue(tenant, len(q))
                break
            else:
                return picked  # nobody else can be admitted
        return picked

    def _retire_cancelled(self) -> None:
        """Under the lock: running rows whose clients left are retired at the next step."""
        for job in [j for j in self._running.values() if j.cancelled]:
            self.decoder.cancel(job.key)
            self._end(job)
            self.stats.cancelled += 1

    def _end(self, job: _Job) -> None:
        job.ended = True
        if self._running.pop(job.key, None) is not None:
            self._rows[job.tenant] -= 1
            if not self._rows[job.tenant]:
                del self._rows[job.tenant]

    def _deliver(self, events: list) -> None:
        items = []
        with self._cv:
            for key, kind, value in events:
                job = self._running.get(key)
                if job is None:  # cancelled meanwhile: nobody listens
                    continue
                if kind == "error":
                    log.error("request %s of %s failed alone: %r", key, job.tenant, value, exc_info=value)
                    self.stats.failed += 1
                    value = _failed(value)
                if kind in ("done", "error"):
                    self._end(job)
                items.append((job, (kind, value)))
        self._outbox.send(items)

    def _fail_everything(self, error: Exception) -> None:
        with self._cv:
            jobs = list(self._running.values())
            for job in jobs:
                self._end(job)
            self.decoder = self.generator.decoder()
        self._outbox.send([(job, ("error", _failed(error))) for job in jobs])


class _Outbox:
    """Events from the decode thread to the event loops their requests wait on.

    `send` appends (job, event) pairs to their loop's pending list and wakes that loop only when
    the list was empty: a loop that has not caught up yet takes everything sent meanwhile in one
    callback (one self-pipe write and one wake-up, instead of one per decoding step).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list] = {}

    def send(self, items: list) -> None:
        woken, closed = [], []
        with self._lock:
            for job, item in items:
                pending = self._pending.setdefault(job.loop, [])
                if not pending:
                    woken.append(job.loop)
                elif job.loop.is_closed() and job.loop not in closed:
                    closed.append(job.loop)  # closed before it drained what it was sent
                pending.append((job, item))
        for loop in woken:
            try:
                loop.call_soon_threadsafe(self._drain, loop)
            except RuntimeError:  # that event loop is closed: its requests are gone
                closed.append(loop)
        for loop in closed:
            with self._lock:
                gone = self._pending.pop(loop, [])
            for job, _ in gone:
                job.cancelled = True

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            items = self._pending.pop(loop, [])
        for job, item in items:
            job.queue.put_nowait(item)


class StoreCalls:
    """Store reads on their own bounded thread pool, each with a timeout.

    A slow or hung store then holds at most `threads` threads (never the event
    loop's default pool, which the rest of the replica uses), and a caller waits
    at most `timeout_s`: StoreTimeout (an OSError, like every other "the store
    did not answer"), and the concept cache serves what it holds (stale) or 503.
    """

    def __init__(self, threads: int = 8, timeout_s: float = 10.0):
        if threads < 1 or timeout_s <= 0:
            raise ValueError(f"threads={threads} must be >= 1 and timeout_s={timeout_s} > 0")
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="store")

    async def __call__(self, fn: Callable, *args):
        fut = asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))
        try:
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise StoreTimeout(f"the store did not answer {getattr(fn, '__name__', fn)} within "
                               f"{self.timeout_s} s") from None


class StoreTimeout(TimeoutError):
    """A store call that took longer than its timeout."""


class ChatError(Exception):
    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.retry_after = status, code, param, retry_after

    def event(self) -> dict:
        ev = {"event": "error", "status": self.status, "message": str(self), "code": self.code,
              "param": self.param}
        if self.retry_after is not None:
            ev["retry_after"] = self.retry_after
        return ev


class ChatEngine:
    """Backbone + concept cache + scheduler: `chat(tenant, Chat)` yields event dicts.

    Events: `start` (concepts used, prompt tokens), `delta` (text), `end`
    (finish reason, token counts), or a single `error` (first, or after deltas
    if the model failed the request).
    """

    def __init__(self, backbone: Backbone, store: ArtifactStore, *, cache_bytes: int = 256 * 2**20,
                 revalidate_s: float = 1.0, max_batch_size: int = 32, max_rows_per_tenant: int | None = None,
                 max_prefill_tokens: int = 4096, kv_budget_tokens: int = 65536,
                 admit_min_rows: int | None = None, admit_max_wait_steps: int = 8,
                 tenant_limits: TenantLimits = TenantLimits(), store_threads: int = 8, store_timeout_s: float = 10.0,
                 on_cache_event: Callable[[str], None] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 on_queue: Callable[[str, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.context_length = context_length(backbone.config)  # first: a model without one fails at once
        self.backbone = backbone
        self.generator = Generator(backbone)
        self.store_calls = StoreCalls(store_threads, store_timeout_s)
        self.cache = ConceptCache(store, backbone.fingerprint, cache_bytes, revalidate_s,
                                  on_event=on_cache_event, io=self.store_calls)
        self.resolver = ConceptResolver(self.cache, Sharing(store), revalidate_s, io=self.store_calls)
        self.scheduler = Scheduler(self.generator, max_batch_size=max_batch_size,
                                   max_rows_per_tenant=max_rows_per_tenant, max_prefill_tokens=max_prefill_tokens,
                                   kv_budget_tokens=kv_budget_tokens, admit_min_rows=admit_min_rows,
                                   admit_max_wait_steps=admit_max_wait_steps, on_queue=on_queue, on_step=on_step)
        self.tenant_limits, self.clock = tenant_limits, clock
        self._lookups: dict[str, TokenBucket] = {}  # per tenant: budget for names that do not exist

    async def chat(self, tenant: str, chat: Chat) -> AsyncIterator[dict]:
        try:
            request, encoded = await self._prepare(tenant, chat)
        except ChatError as e:
            log.info("request %s of %s refused (%d): %s", chat.request_id, tenant, e.status, e)
            yield e.event()
            return
        yield {"event": "start", "prompt_tokens": len(encoded),
               "concepts": [c.tokens.identifier for c in request.concepts]}
        try:
            async for kind, value in self.scheduler.stream(request, tenant, encoded):
                if kind == "delta":
                    yield {"event": "delta", "text": value}
                else:
                    res: GenerationResult = value
                    yield {"event": "end", "finish_reason": res.finish_reason,
                           "prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids)}
        except GenerationFailed as e:
            log.error("request %s of %s: %s", chat.request_id, tenant, e)
            yield ChatError("the model failed to answer this request", 500, "internal_error").event()

    async def _prepare(self, tenant: str, chat: Chat) -> tuple[GenerationRequest, Encoded]:
        concepts = await self._resolve(tenant, chat.refs)
        try:
            params = SamplingParams(chat.max_tokens, chat.temperature, chat.top_p, chat.stop, chat.seed)
            request = GenerationRequest(chat.messages, concepts, chat.images, params, stream=chat.stream)
            encoded = self.generator.encode(request)
        except ValueError as e:
            raise ChatError(str(e)) from None
        n = len(encoded)
        if n + chat.max_tokens > self.context_length:
            raise ChatError(f"the prompt has {n} tokens; with max_tokens={chat.max_tokens} that exceeds "
                            f"the model's context of {self.context_length}", 400,
                            "context_length_exceeded", "messages")
        try:
            self.scheduler.check(n, chat.max_tokens)
        except ValueError as e:
            raise ChatError(str(e), 400, "context_length_exceeded", "max_tokens") from None
        return request, encoded

    async def _resolve(self, tenant: str, refs: list[str]) -> list[ConceptRows]:
        """The concepts of `refs`; a ChatError naming the ref as typed, nothing from inside the store.

        A broken artifact is a 500 (retrying will not help); a store that cannot answer (FileStore's
        OSError, a timeout, the S3 backend's `access_errors`) a 503, unless the cache holds the concept
        (then it is served stale). Names not cached cost a store lookup: those that turn out not to
        exist spend the tenant's budget of unknown-name lookups; when it is spent, a request naming
        an uncached concept is a 429 (cached ones still work). Anything else is a bug and propagates.
        """
        fresh = [r for r in refs if split_ref(r, tenant) not in self.cache]
        bucket = self._lookups.get(tenant)
        if bucket is None:
            lim = self.tenant_limits
            bucket = self._lookups[tenant] = TokenBucket(lim.unknown_concepts_per_s, lim.unknown_concepts_burst,
                                                         self.clock)
        wait = bucket.wait() if fresh else 0.0
        if wait > 0:
            raise ChatError(f"too many lookups of concept names that do not exist; retry in {wait:.1f} s", 429,
                            "rate_limit_exceeded", "messages", retry_after=wait)
        try:
            rows = await self.resolver.resolve(tenant, refs)
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
        found = {c.tokens.identifier for c in rows}
        unknown = sum(1 for r in fresh if f"<{r}>" not in found)
        if unknown:
            bucket.charge(unknown)
        return rows


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
