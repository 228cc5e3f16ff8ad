"""Concepts for requests: sharing rules, and a per-replica LRU cache (by bytes) over the store.

Resolution of what a tenant types:

    <bo>        -> concept `bo` of the caller
    <alice/bo>  -> concept `bo` of alice, if alice shared it with the caller
                   (or the caller is alice)

A reference that does not resolve, whether the concept does not exist or is
not shared with the caller, stays plain text: the answer is the same in both
cases, so nothing tells a caller what exists (and `vector<int>` in pasted code
still works). The store is the only source of truth; the cache revalidates an
entry against `latest_version` once it is older than `revalidate_s`, so a new
version is picked up and a deleted concept stops answering within that time
(0 = on every request). Grants are checked with the same bound: an unshare
(or a deletion) that returned is in force on every replica within
`revalidate_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from cluster.shares import Grants
from cluster.store import ArtifactStore, ConceptNotFound, access_errors
from yollava.artifacts import ArtifactError
from yollava.concept_model import ConceptRows
from yollava.tokens import ConceptTokens


class Sharing(Grants):
    """Who may use a concept besides its owner: one object per grant (`cluster.shares`)."""


def split_ref(ref: str, tenant: str) -> tuple[str, str]:
    """`bo` -> (tenant, bo); `alice/bo` -> (alice, bo)."""
    owner, _, name = ref.rpartition("/")
    return (owner or tenant), name


@dataclass
class _Entry:
    version: int
    rows: ConceptRows
    nbytes: int
    checked: float


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    revalidations: int = 0
    stale: int = 0  # served from the cache because the store did not answer


class ConceptCache:
    """A bounded LRU of concept rows (by bytes), filled from the store on first use.

    Concurrent first uses of one concept wait for one load (single flight);
    so do concurrent revalidations. Runs on one asyncio loop (a replica's);
    store calls go to threads.
    """

    def __init__(self, store: ArtifactStore, fingerprint: str | None, max_bytes: int = 256 * 2**20,
                 revalidate_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[str], None] | None = None,
                 io: Callable[..., Awaitable] | None = None):
        # io(fn, *args): how store calls run (the engine's bounded pool with timeouts; default a thread)
        self._io = io or asyncio.to_thread
        if max_bytes < 1 or revalidate_s < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1 and revalidate_s={revalidate_s} >= 0")
        self.store, self.fingerprint = store, fingerprint
        self.max_bytes, self.revalidate_s, self.clock = max_bytes, revalidate_s, clock
        self.on_event = on_event or (lambda event: None)
        self.stats = CacheStats()
        self._lru: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._absent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self.nbytes = 0

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    async def get(self, owner: str, name: str) -> ConceptRows | None:
        """The latest rows of owner/name, or None if it does not exist."""
        key = (owner, name)
        now = self.clock()
        entry = self._lru.get(key)
        if entry is not None and now - entry.checked < self.revalidate_s:
            self._lru.move_to_end(key)
            self._count("hits")
            return entry.rows
        if entry is None and key in self._absent and now - self._absent[key] < self.revalidate_s:
            return None
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._refresh(key))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    def evict(self, owner: str, name: str) -> bool:
        entry = self._lru.pop((owner, name), None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry is not None

    async def _refresh(self, key: tuple[str, str]) -> ConceptRows | None:
        owner, name = key
        entry = self._lru.get(key)
        try:
            latest = await self._io(self.store.latest_version, owner, name)
        except (OSError, *access_errors()):  # the store did not answer: what we hold beats a 503
            if entry is None:
                raise
            return self._stale(key, entry)
        entry = self._lru.get(key)
        if latest is None:
            self.evict(owner, name)
            self._mark_absent(key)
            self._count("misses")
            return None
        self._absent.pop(key, None)
        if entry is not None and entry.version == latest:
            entry.checked = self.clock()
            self._lru.move_to_end(key)
            self._count("revalidations")
            self._count("hits")
            return entry.rows
        self._count("misses")
        try:
            art = await self._io(self.store.get_concept, owner, name, latest, self.fingerprint)
        except ConceptNotFound:  # deleted between the listing and the read
            self.evict(owner, name)
            self._mark_absent(key)
            return None
        except (OSError, *access_errors()):
            if entry is None:
                raise
            return self._stale(key, entry)
        self._count("loads")
        rows = art.rows
        self._put(key, _Entry(latest, rows, _nbytes(rows), self.clock()))
        return rows

    def _stale(self, key: tuple[str, str], entry: _Entry) -> ConceptRows:
        """The cached rows, served while the store does not answer (rechecked on the next use)."""
        if key in self._lru:  # (it may have been evicted while the store was asked)
            self._lru.move_to_end(key)
        self._count("stale")
        return entry.rows

    def _put(self, key: tuple[str, str], entry: _Entry) -> None:
        self.evict(*key)
        self._lru[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self.nbytes -= old.nbytes
            self._count("evictions")

    def _mark_absent(self, key: tuple[str, str]) -> None:
        self._absent[key] = self.clock()
        self._absent.move_to_end(key)
        while len(self._absent) > 10_000:
            self._absent.popitem(last=False)

    def _count(self, event: str) -> None:
        setattr(self.stats, event, getattr(self.stats, event) + 1)
        self.on_event(event)


def _nbytes(rows: ConceptRows) -> int:
    return sum(t.numel() * t.element_size() for t in (rows.embed, rows.head))


class ConceptBroken(Exception):
    """A concept the caller may use whose stored artifact fails its checks on load.

    `ref` is the reference as the caller typed it; the store's own words (paths,
    digests) are in `__cause__`, for the log only.
    """

    def __init__(self, ref: str):
        super().__init__(f"concept <{ref}> failed its integrity check on load")
        self.ref = ref


class ConceptResolver:
    """A tenant's `<ref>`s -> the concept rows it may use, shown as it typed them."""

    def __init__(self, cache: ConceptCache, sharing: Sharing, revalidate_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, io: Callable[..., Awaitable] | None = None):
        self._io = io or asyncio.to_thread
        self.cache, self.sharing = cache, sharing
        self.revalidate_s, self.clock = revalidate_s, clock
        self._grants: dict[tuple[str, str, str], tuple[bool, float]] = {}

    async def resolve(self, tenant: str, refs: list[str]) -> list[ConceptRows]:
        found = await asyncio.gather(*(self._one(tenant, r) for r in refs))
        return [rows for rows in found if rows is not None]

    async def _one(self, tenant: str, ref: str) -> ConceptRows | None:
        owner, name = split_ref(ref, tenant)
        if owner != tenant and not await self._allowed(owner, name, tenant):
            return None
        try:
            rows = await self.cache.get(owner, name)
        except ArtifactError as e:  # tampered, corrupt, or made for another base model
            raise ConceptBroken(ref) from e
        if rows is None:
            return None
        display = ref if "/" in ref else None
        return ConceptRows(ConceptTokens(name, rows.tokens.num_latent, display=display), rows.embed, rows.head)

    async def _allowed(self, owner: str, name: str, tenant: str) -> bool:
        key = (owner, name, tenant)
        hit = self._grants.get(key)
        if hit is not None and self.clock() - hit[1] < self.revalidate_s:
            return hit[0]
        allowed = await self._io(self.sharing.allowed, owner, name, tenant)
        if len(self._grants) > 10_000:
            self._grants.clear()
        self._grants[key] = (allowed, self.clock())
        return allowed
