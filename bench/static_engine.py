"""The static engine the chat service had before continuous batching, kept only as the
benchmark's baseline (`bench.serve_multitenant`); nothing in the service uses it.

A batch is gathered for up to `batch_wait_s` after its first request (or until
`max_batch_size`), then decoded in one call until its longest answer ends:
finished rows keep being fed padding, a request that arrives meanwhile waits
for the whole batch, and each row's text is decoded again from its first token
at every step. (The one-shot loop is the old `Generator.generate`, written
here over the same model pieces; the row-by-row retry of a failed batch is
left out: the benchmark has no failures.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from yollava.batching import pad
from yollava.concept_model import ConceptTable, positions_from_mask
from yollava.generate import GenerationRequest, GenerationResult, Generator


class _Row:
    def __init__(self, n_prompt, params, device):
        self.n_prompt, self.params = n_prompt, params
        self.ids, self.text, self.emitted, self.finish = [], "", 0, None
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def stable_len(self) -> int:
        hold = max((len(s) - 1 for s in self.params.stop), default=0)
        n = len(self.text) - hold
        while n > 0 and self.text[n - 1] == "\ufffd":
            n -= 1
        return max(n, self.emitted)


@torch.no_grad()
def static_generate(g: Generator, requests, on_delta=None) -> list[GenerationResult]:
    """The old one-shot loop: every row stays in the batch until the longest has ended."""
    from yollava.generate import Decoder

    bb, lm, dev = g.backbone, g.lm, g.backbone.device
    encs = [g.encode(r) for r in requests]
    rows = [_Row(len(e), r.params, dev) for e, r in zip(encs, requests)]
    batch = pad(encs, side="left", pad_id=bb.tokenizer.pad_token_id or 0, device=dev)
    ids, mask = batch.ids, batch.mask
    photos = [im for r in requests for im in r.images]
    feats = bb.image_features(bb.preprocess(photos)) if photos else None  # (N, n_img, d)
    table = ConceptTable.build([r.concepts for r in requests], bb.hidden_size, bb.dtype, dev)
    latent = table.valid & ~table.generatable  # (B, S)
    h, cache = lm.hidden(lm.embed(ids, table, feats, batch.image_mask), mask, use_cache=True)
    pos = positions_from_mask(mask)[:, -1:]  # (B, 1)
    pad_id = bb.tokenizer.pad_token_id or 0
    for _ in range(max(r.params.max_new_tokens for r in rows)):
        logits = lm.logits(h[:, -1:], table)[:, 0].float()  # (B, V + S)
        logits[:, lm.V:] = logits[:, lm.V:].masked_fill(latent, float("-inf"))
        logits[:, g.tokens:lm.V] = float("-inf")
        width = (lm.V + table.valid.sum(1)).tolist()
        nxt = [Decoder._choose(logits[b, :width[b]], row) if row.finish is None else pad_id
               for b, row in enumerate(rows)]
        for b, row in enumerate(rows):
            if row.finish is None:
                _advance(g, b, row, nxt[b], requests[b], on_delta)
        if all(r.finish is not None for r in rows):
            break
        step_ids = torch.tensor(nxt, device=dev).unsqueeze(1)  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        pos = pos + 1
        h, cache = lm.hidden(lm.embed(step_ids, table), mask, pos, cache, use_cache=True)
    return [GenerationResult(r.text, r.ids, r.finish or "length", r.n_prompt) for r in rows]


def _advance(g: Generator, b, row, token, req, on_delta) -> None:
    if token == g.backbone.tokenizer.eos_token_id:
        row.finish = "stop"
    else:
        row.ids.append(token)
        row.text = g.encoder.decode(row.ids, [c.tokens for c in req.concepts])  # the whole answer again
        hits = [i for i in (row.text.find(s) for s in row.params.stop) if i >= 0]
        if hits:
            row.text, row.finish = row.text[:min(hits)], "stop"
        elif len(row.ids) >= row.params.max_new_tokens:
            row.finish = "length"
    end = len(row.text) if row.finish else row.stable_len()
    if on_delta and end > row.emitted:
        on_delta(b, row.text[row.emitted:end])
    row.emitted = max(row.emitted, end)


@dataclass
class _Job:
    request: GenerationRequest
    queue: asyncio.Queue
    arrived: float


class StaticScheduler:
    """Drop-in for `serve.engine.Scheduler` in `ChatEngine.scheduler` (the benchmark swaps it in)."""

    def __init__(self, generator: Generator, max_batch_size: int = 32, batch_wait_s: float = 0.005,
                 generate=None):
        """`generate(requests, on_delta)`: the one-shot call; default the old loop (`static_generate`);
        `generator.generate` gives static batches on the new decoder (finished rows leave the batch)."""
        self.generator, self.max_batch_size, self.batch_wait_s = generator, max_batch_size, batch_wait_s
        self.generate = generate or (lambda requests, on_delta: static_generate(generator, requests, on_delta))
        self._pending: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        pass

    async def stream(self, request, tenant="-", encoded=None) -> AsyncIterator[tuple[str, object]]:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._pending = asyncio.Queue()
            self._task = loop.create_task(self._run())
        job = _Job(request, asyncio.Queue(), loop.time())
        self._pending.put_nowait(job)
        while True:
            kind, value = await job.queue.get()
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
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
                except TimeoutError:
                    break
            self.batches += 1

            def on_delta(i: int, text: str, batch=batch) -> None:
                loop.call_soon_threadsafe(batch[i].queue.put_nowait, ("delta", text))

            results = await asyncio.to_thread(self.generate, [j.request for j in batch], on_delta)
            for job, res in zip(batch, results):
                job.queue.put_nowait(("done", res))
