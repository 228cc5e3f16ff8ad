"""Batched decoding with a KV cache and per-sequence concepts and photos, step by step.

`Decoder` is continuous batching: `admit` prefills newcomers (together,
left-padded) and joins their KV cache to the running batch; `step` gives every
live row one token and retires rows that finished, failed or were cancelled.
The batch's cache is one left-padded tensor per layer inside a buffer with
spare columns and rows (`_Batch`): a step writes its keys and values in place,
a retired row's slot is refilled by moving one row, newcomers are written into
free rows, and columns no row needs any more are cut off; the buffer is copied
only when its spare runs out (ADR 002 has the measurements against
concatenating at every step and against per-row caches stacked every step).

Each request brings its own messages, concepts, photos and sampling settings.
A row's tokens depend only on its own inputs: its concept table and columns
are its own, padding is masked, its seeded sampler draws only for it; so a
request's answer is the same whoever joins or leaves around it. A row that
fails (NaN scores, a bad photo, an error inside the model for its inputs)
fails alone: the step is retried on halves of the batch to find it. Latent
concept tokens are never generated; identifiers may be, and decode to `<name>`.
Text is detokenized incrementally (a short window per step, not the whole
answer again).

`Generator.generate` is the one-shot form: admit everything, step until done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Hashable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from yollava.backbone import Backbone
from yollava.batching import pad
from yollava.concept_model import ConceptLM, ConceptRows, ConceptTable, positions_from_mask
from yollava.prompt import Encoded, Message, PromptEncoder
from yollava.tokens import ConceptTokens

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 1e-4  # below this (but above 0) logits / temperature overflows float32 scores
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature={self.temperature} must be 0 (greedy) or >= {MIN_TEMPERATURE}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed={self.seed} must be in 0..{MAX_SEED}")


@dataclass
class GenerationRequest:
    messages: list[Message]
    concepts: list[ConceptRows] = field(default_factory=list)
    images: list = field(default_factory=list)  # PIL images, in the order the turns use them
    params: SamplingParams = field(default_factory=SamplingParams)
    # False: nobody reads the text before the end, so it is decoded once when the row ends (one
    # "delta" with all of it), unless stop strings need it at every step.
    stream: bool = True


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int


class RowError(RuntimeError):
    """One request failed while the others in its batch went on; the message says why."""


DeltaCallback = Callable[[int, str], None]  # (request index, new text)
# (request key, "delta" | "done" | "error", new text | GenerationResult | the exception)
Event = tuple[Hashable, str, object]


class IncrementalText:
    """The text of a growing list of ids, a few tokens decoded per step (vLLM's and TGI's offsets).

    `push(ids)` returns the text the newest ids added: it decodes the window
    from the previous read offset on and keeps what lies past the text of the
    window's first part, holding back a character still incomplete (a trailing
    U+FFFD) until its last byte arrives; `final=True` releases everything. The
    pieces add up to `PromptEncoder.decode(ids)` (a test checks it on both test
    tokenizers); a decoder for which a window's text is not a prefix of the
    next window's raises RowError rather than send text that would differ.
    """

    def __init__(self, encoder: PromptEncoder, concepts: Sequence[ConceptTokens]):
        self.encoder, self.concepts = encoder, list(concepts)
        self.prefix = self.read = 0
        self.prefix_text = ""

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        text = self.encoder.decode(ids[self.prefix:], self.concepts)
        if not text.startswith(self.prefix_text):
            raise RowError(f"the tokenizer does not decode incrementally: ids {list(ids[self.prefix:])} "
                           f"decode to {text!r}, which does not extend {self.prefix_text!r}")
        if len(text) < len(self.prefix_text) or (text.endswith("\ufffd") and not final):
            return ""
        new = text[len(self.prefix_text):]
        self.prefix, self.read = self.read, len(ids)
        self.prefix_text = self.encoder.decode(ids[self.prefix:self.read], self.concepts)
        return new


class _Row:
    """Decoding state of one request."""

    def __init__(self, key: Hashable, req: GenerationRequest, enc: Encoded, encoder: PromptEncoder, device):
        self.key, self.req, self.enc, self.params = key, req, enc, req.params
        self.tokens = [c.tokens for c in req.concepts]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None
        self.cancelled = False
        self.detok = IncrementalText(encoder, self.tokens)
        self.hold = max((len(s) - 1 for s in self.params.stop), default=0)
        self.text_each_step = req.stream or bool(self.params.stop)
        self.gen = None
        if self.params.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(self.params.seed if self.params.seed is not None else torch.seed())

    @property
    def reserve(self) -> int:
        """The most tokens this row's cache can ever hold: prompt + max_new_tokens."""
        return len(self.enc) + self.params.max_new_tokens


@dataclass
class _Batch:
    """Live rows and their cache.

    The keys and values live in per-layer buffers with room to spare: rows [0, B) and columns
    [lo, lo + T) are the batch (left-padded), columns after it are free for the next steps, rows
    after it for newcomers. Stepping, retiring (`_retire`) and joining newcomers (`_append`) work
    in place on the buffers and hand back a new `_Batch` (the old one is spent); `_select` and
    `_join` copy, leaving their inputs intact (failure isolation runs halves of a batch with them).
    """

    rows: list[_Row]
    kv: list[tuple[Tensor, Tensor]]  # per layer: key and value buffers (R >= B, H, C >= lo + T, D)
    mask: Tensor  # (B, T) 1 = a real token
    pos: Tensor  # (B, 1) position of each row's last token
    h: Tensor  # (B, d) hidden state at each row's last token: the next token's scores come from it
    table: ConceptTable  # (B, S, d) each row's own concept rows
    lo: int = 0  # the batch's first column in the buffers

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def views(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer: the batch's keys and values, (B, H, T, D) views into the buffers."""
        B, lo, hi = len(self.rows), self.lo, self.lo + self.width
        return [(k[:B, :, lo:hi], v[:B, :, lo:hi]) for k, v in self.kv]


SPARE_COLUMNS = 64  # a rebuilt buffer's free columns: steps write their keys and values in place
SPARE_ROWS = 8  # a rebuilt buffer's free rows: newcomers are written in place


def _buffer(t: Tensor, left: int = 0, rows: int = 0) -> Tensor:
    """(B, H, T, D) -> a (B + rows, H, left + T + SPARE_COLUMNS, D) buffer holding `t` after
    `left` zero columns; the spare rows and columns are written before they are ever read."""
    B, H, T, D = t.shape
    buf = t.new_empty(B + rows, H, left + T + SPARE_COLUMNS, D)
    buf[:B, :, :left].zero_()
    buf[:B, :, left:left + T].copy_(t)
    return buf


def _first_used(mask: Tensor) -> int:
    """(n, T) -> the first column some row uses: the columns before it can be cut off."""
    return int(mask.any(0).int().argmax())


def _select(b: _Batch | None, idx: Sequence[int]) -> _Batch | None:
    """Rows `idx` of `b` in new buffers (None if none), `b` intact; columns no kept row uses any
    more are cut off the left."""
    if b is None or not idx:
        return None
    if list(idx) == list(range(len(b.rows))):
        return b
    i = torch.tensor(list(idx), device=b.mask.device)
    mask = b.mask[i]  # (n, T)
    first = _first_used(mask)
    kv = [(_buffer(k[i, :, first:]), _buffer(v[i, :, first:]))
          for k, v in b.views()]  # (n, H, T - first + SPARE_COLUMNS, D)
    return _Batch([b.rows[j] for j in idx], kv, mask[:, first:], b.pos[i], b.h[i], b.table.select(i))


def _retire(b: _Batch | None, keep: Sequence[int]) -> _Batch | None:
    """Rows `keep` of `b`, in place (`b` is spent): the kept rows past the new end move into the
    slots of rows that leave (only theirs are copied; the order of rows changes), and columns no
    kept row uses any more are cut off the left."""
    if b is None or not keep:
        return None
    B, n = len(b.rows), len(keep)
    if n == B:
        return b
    kept = set(keep)
    holes = [i for i in range(n) if i not in kept]  # slots freed inside the new batch
    movers = [i for i in keep if i >= n]  # kept rows past its end, one per hole
    order = list(range(n))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    if holes:
        dst = torch.tensor(holes, device=b.mask.device)
        src = torch.tensor(movers, device=b.mask.device)
        lo, hi = b.lo, b.lo + b.width
        for (k, v), (kb, vb) in zip(b.views(), b.kv):
            kb[:, :, lo:hi].index_copy_(0, dst, k[src])  # (holes, H, T, D) rows moved
            vb[:, :, lo:hi].index_copy_(0, dst, v[src])
    i = torch.tensor(order, device=b.mask.device)
    mask = b.mask[i]  # (n, T)
    first = _first_used(mask)
    return _Batch([b.rows[j] for j in order], b.kv, mask[:, first:], b.pos[i], b.h[i], b.table.select(i),
                  b.lo + first)


def _pad_left(t: Tensor, n: int, dim: int) -> Tensor:
    """`n` zero columns before `t` along `dim` (a negative dim)."""
    if n == 0:
        return t
    widths = [0, 0] * (-dim - 1) + [n, 0]
    return F.pad(t, widths)


def _join_tables(a: ConceptTable, b: ConceptTable) -> ConceptTable:
    S = max(a.num_slots, b.num_slots)

    def slots(t: ConceptTable) -> ConceptTable:
        n = S - t.num_slots
        if n == 0:
            return t
        return ConceptTable(F.pad(t.embed, (0, 0, 0, n)), F.pad(t.head, (0, 0, 0, n)),  # (B, S, d)
                            F.pad(t.valid, (0, n)), F.pad(t.generatable, (0, n)))  # (B, S), padded False

    a, b = slots(a), slots(b)
    return ConceptTable(torch.cat([a.embed, b.embed]), torch.cat([a.head, b.head]),
                        torch.cat([a.valid, b.valid]), torch.cat([a.generatable, b.generatable]))


def _joined(a: _Batch, b: _Batch, kv: list[tuple[Tensor, Tensor]], lo: int) -> _Batch:
    """`a`'s rows then `b`'s over the buffers `kv` (already holding both, from column `lo`)."""
    T = max(a.width, b.width)
    mask = torch.cat([_pad_left(a.mask, T - a.width, -1), _pad_left(b.mask, T - b.width, -1)])  # (Ba + Bb, T)
    return _Batch(a.rows + b.rows, kv, mask, torch.cat([a.pos, b.pos]), torch.cat([a.h, b.h]),
                  _join_tables(a.table, b.table), lo)


def _join(a: _Batch | None, b: _Batch | None, spare_rows: int = 0) -> _Batch | None:
    """`a`'s rows then `b`'s, left-padded to the wider of the two, in new buffers (both intact)."""
    if a is None or b is None:
        return a if b is None else b
    T = max(a.width, b.width)

    def cat(x: Tensor, y: Tensor) -> Tensor:  # (Ba | Bb, H, ., D) -> (Ba + Bb + spare_rows, H, T + SPARE_COLUMNS, D)
        return torch.cat([_buffer(x, T - a.width), _buffer(y, T - b.width, rows=spare_rows)])

    kv = [(cat(ka, kb), cat(va, vb)) for (ka, va), (kb, vb) in zip(a.views(), b.views())]
    return _joined(a, b, kv, 0)


def _append(a: _Batch | None, b: _Batch) -> _Batch:
    """`a`'s rows then `b`'s, written into `a`'s buffers (`a` is spent; `b` intact) when they have
    the rows and the columns to the left; otherwise both are copied into new, larger buffers."""
    if a is None:
        return b
    Ba, Bb, T = len(a.rows), len(b.rows), max(a.width, b.width)
    hi = a.lo + a.width  # every row's last column
    lo = hi - T
    if lo < 0 or Ba + Bb > a.kv[0][0].shape[0]:
        return _join(a, b, spare_rows=SPARE_ROWS)
    for (ka, va), (kb, vb) in zip(a.kv, b.views()):
        for buf, new in ((ka, kb), (va, vb)):
            buf[:Ba, :, lo:a.lo].zero_()  # columns the running rows did not use (stale values)
            buf[Ba:Ba + Bb, :, lo:hi - b.width].zero_()  # the newcomers' left padding
            buf[Ba:Ba + Bb, :, hi - b.width:hi].copy_(new)
    return _joined(a, b, a.kv, lo)


class _AppendLayer(DynamicLayer):
    """One layer's keys and values as a view into the batch's buffers: a step writes its column
    in place, after the batch's (the buffers are rebuilt only when their spare columns run out),
    instead of DynamicLayer's concatenation, which copies the whole cache at every step."""

    def __init__(self, keys: Tensor, values: Tensor, rows: int, lo: int, width: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values  # buffers (R, H, C, D)
        self.rows, self.lo, self.width = rows, lo, width

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        B, lo, n = self.rows, self.lo, key_states.shape[-2]  # (B, H, n, D) new columns
        if lo + self.width + n > self.keys.shape[-2]:  # out of columns: rebuilt from column 0
            spare = max(self.keys.shape[0] - B, SPARE_ROWS)
            self.keys = _buffer(self.keys[:B, :, lo:lo + self.width], rows=spare)
            self.values = _buffer(self.values[:B, :, lo:lo + self.width], rows=spare)
            self.lo = lo = 0
        hi = lo + self.width
        self.keys[:B, :, hi:hi + n] = key_states
        self.values[:B, :, hi:hi + n] = value_states
        self.width += n
        return self.keys[:B, :, lo:hi + n], self.values[:B, :, lo:hi + n]  # (B, H, width, D) views

    def get_seq_length(self) -> int:
        return self.width


def _cache(b: _Batch) -> DynamicCache:
    """A cache over `b`'s buffers (no copy): the model writes its new columns after the batch's, in
    place, so `b` itself is not changed (a batch whose step failed can still be selected from)."""
    cache = DynamicCache()
    cache.layers = [_AppendLayer(k, v, len(b.rows), b.lo, b.width) for k, v in b.kv]
    return cache


class Decoder:
    """Continuous batching over one `Generator`: rows join (`admit`) and leave (`step`, `cancel`)
    between steps. Not thread-safe: one thread drives it."""

    def __init__(self, generator: "Generator"):
        self.g = generator
        self.bb, self.lm = generator.backbone, generator.lm
        text = getattr(self.bb.config, "text_config", None) or self.bb.config
        # A sliding-window model needs the model's own mask per layer type; the others take ours.
        self._own_mask = not getattr(text, "sliding_window", None)
        self._batch: _Batch | None = None
        self._rows: dict[Hashable, _Row] = {}

    # -- what the scheduler reads

    def __len__(self) -> int:
        return 0 if self._batch is None else len(self._batch.rows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    @property
    def kv_tokens(self) -> int:
        """Tokens the cache holds now, padding included (rows x width)."""
        b = self._batch
        return 0 if b is None else len(b.rows) * b.width

    def kv_bound(self, reserves: Sequence[int] = ()) -> int:
        """The most tokens the padded cache can reach with the live rows plus rows reserving `reserves`
        (prompt + max_new_tokens each): every row padded to the longest reservation."""
        all_ = [r.reserve for r in self._rows.values()] + list(reserves)
        return len(all_) * max(all_, default=0)

    def cancel(self, key: Hashable) -> None:
        """Retire a row at the next step (nothing more is sent for it)."""
        row = self._rows.get(key)
        if row is not None:
            row.cancelled = True

    # -- admission

    @torch.no_grad()
    def admit(self, requests: Mapping[Hashable, GenerationRequest],
              encoded: Mapping[Hashable, Encoded] | None = None) -> list[Event]:
        """Prefill newcomers together and join them to the batch; their first token comes at the
        next `step`. A request that cannot be encoded or prefilled gets an "error" event."""
        events: list[Event] = []
        rows = []
        for key, req in requests.items():
            if key in self._rows:
                raise ValueError(f"request key {key!r} is already decoding")
            enc = (encoded or {}).get(key)
            if enc is None:
                try:
                    enc = self.g.encode(req)
                except ValueError as e:
                    events.append((key, "error", e))
                    continue
            rows.append(_Row(key, req, enc, self.g.encoder, self.bb.device))
        new = self._isolating(self._prefill, rows, events) if rows else None
        if new is not None:
            for row in new.rows:
                row.req = None  # photos and concept rows are in the cache and table now
                self._rows[row.key] = row
            self._batch = self._add_rows(self._batch, new)
        return events

    def _prefill(self, rows: list[_Row]) -> _Batch:
        bb, dev = self.bb, self.bb.device
        batch = pad([r.enc for r in rows], side="left", pad_id=bb.tokenizer.pad_token_id or 0, device=dev)
        photos = [im for r in rows for im in r.req.images]
        feats = bb.image_features(bb.preprocess(photos)) if photos else None  # (N, n_img, d)
        table = ConceptTable.build([r.req.concepts for r in rows], bb.hidden_size, bb.dtype, dev)
        x = self.lm.embed(batch.ids, table, feats, batch.image_mask)  # (n, T, d)
        h, cache = self.lm.hidden(x, batch.mask, use_cache=True)
        pos = positions_from_mask(batch.mask)[:, -1:]  # (n, 1)
        return _Batch(list(rows), [(l.keys, l.values) for l in cache.layers], batch.mask, pos, h[:, -1], table)

    # -- one step

    @torch.no_grad()
    def step(self) -> list[Event]:
        """One token for every live row; finished, failed and cancelled rows leave the batch."""
        events: list[Event] = []
        b = self._batch
        if b is None:
            return events
        for row in b.rows:
            if row.cancelled:
                self._rows.pop(row.key, None)
        b = self._retire_rows(b, [i for i, r in enumerate(b.rows) if not r.cancelled])
        if b is None:
            self._batch = None
            return events
        V = self.lm.V
        logits = self.lm.logits(b.h.unsqueeze(1), b.table)[:, 0].float()  # (B, V + S)
        latent = b.table.valid & ~b.table.generatable  # (B, S)
        logits[:, V:] = logits[:, V:].masked_fill(latent, float("-inf"))
        logits[:, self.g.tokens:V] = float("-inf")
        broken = torch.isnan(logits).any(-1).tolist()  # (B,)
        width = (V + b.table.valid.sum(1)).tolist()  # each row's own columns
        # Greedy rows at once: the other rows' columns are -inf in this row, so the argmax over all
        # columns is the argmax over its own (the first maximum either way).
        greedy = logits.argmax(-1).tolist()  # (B,)
        nxt: list[int] = []
        for i, row in enumerate(b.rows):
            try:
                if broken[i]:
                    raise RowError("the model produced NaN scores for this request "
                                   "(a damaged concept or photo?)")
                token = greedy[i] if row.params.temperature == 0 else self._choose(logits[i, :width[i]], row)
                nxt.append(token)
                self._advance(row, token, events)
            except RowError as e:
                nxt.append(0)
                self._fail(row, e, events)
        chosen = {row.key: token for row, token in zip(b.rows, nxt) if row.finish is None}
        b = self._retire_rows(b, [i for i, r in enumerate(b.rows) if r.finish is None])
        self._batch = self._isolating(lambda rows, full=b: self._forward(full, rows, chosen),
                                      b.rows, events) if b is not None else None
        return events

    def _forward(self, full: _Batch, rows: list[_Row], chosen: Mapping[Hashable, int]) -> _Batch:
        """Feed each row its chosen token; `rows` may be a part of `full` (when isolating a failure)."""
        b = full if len(rows) == len(full.rows) else _select(full, [full.rows.index(r) for r in rows])
        ids = torch.tensor([chosen[r.key] for r in b.rows], device=b.mask.device).unsqueeze(1)  # (B, 1)
        mask = torch.cat([b.mask, torch.ones_like(ids)], dim=1)  # (B, T + 1)
        pos = b.pos + 1
        # One query per row: the mask is just which columns each row attends to, given as SDPA's
        # boolean (B, 1, 1, T + 1) so that the model does not build it again at every step.
        attend = mask[:, None, None, :].bool() if self._own_mask else mask
        h, cache = self.lm.hidden(self.lm.embed(ids, b.table), attend, pos, self._cache(b), use_cache=True)
        lo = {getattr(layer, "lo", 0) for layer in cache.layers}
        if len(lo) != 1:
            raise RuntimeError(f"the layers' caches were rebuilt apart (first columns {sorted(lo)})")
        return _Batch(b.rows, [(layer.keys, layer.values) for layer in cache.layers], mask, pos, h[:, -1], b.table,
                      lo.pop())

    # The cache layout (overridden by bench.kv_layout's baselines): in place, see `_Batch`.
    _retire_rows = staticmethod(_retire)
    _add_rows = staticmethod(_append)
    _cache = staticmethod(_cache)

    def _isolating(self, run: Callable[[list[_Row]], _Batch], rows: list[_Row],
                   events: list[Event]) -> _Batch | None:
        """`run(rows)`; if it raises, run halves so only the row(s) that fail alone fail.

        Broad on purpose: whatever the model raises for some input must fail that input's row,
        never its neighbours; the error goes to the row's caller (and the log), not into a default.
        """
        try:
            return run(rows)
        except Exception as e:
            if len(rows) == 1:
                self._fail(rows[0], e, events)
                return None
            log.warning("a batch of %d rows failed (%r); running halves to find the failing row", len(rows), e)
            half = len(rows) // 2
            return _join(self._isolating(run, rows[:half], events), self._isolating(run, rows[half:], events))

    def _fail(self, row: _Row, error: Exception, events: list[Event]) -> None:
        row.finish = "error"
        self._rows.pop(row.key, None)
        events.append((row.key, "error", error))

    @staticmethod
    def _choose(logits: Tensor, row: _Row) -> int:
        """(V + S_row,) logits -> one token id, greedy or temperature/top-p.

        Only the row's own columns are passed, so a seeded sample does not
        depend on which other requests share the batch.
        """
        p = row.params
        if p.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise RowError(f"temperature={p.temperature} gives non-finite probabilities for this request")
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=row.gen))

    def _advance(self, row: _Row, token: int, events: list[Event]) -> None:
        before = len(row.text)
        if token == self.bb.tokenizer.eos_token_id:
            row.finish = "stop"
            row.text += row.detok.push(row.ids, final=True)
        else:
            row.ids.append(token)
            last = len(row.ids) >= row.params.max_new_tokens
            if row.text_each_step or last:
                row.text += row.detok.push(row.ids, final=last)
            if last:
                row.finish = "length"
        if row.params.stop:  # only the new text, and what a stop string can reach back into
            start = max(0, before - row.hold)
            hits = [i for i in (row.text.find(s, start) for s in row.params.stop) if i >= 0]
            if hits:
                row.text, row.finish = row.text[:min(hits)], "stop"
        end = len(row.text) if row.finish else max(len(row.text) - row.hold, row.emitted)
        if end > row.emitted:
            events.append((row.key, "delta", row.text[row.emitted:end]))
            row.emitted = end
        if row.finish:
            self._rows.pop(row.key, None)
            events.append((row.key, "done", GenerationResult(row.text, row.ids, row.finish, len(row.enc))))


class Generator:
    def __init__(self, backbone: Backbone, encoder: PromptEncoder | None = None):
        self.backbone = backbone
        self.lm = ConceptLM(backbone)
        self.encoder = encoder or PromptEncoder.for_backbone(backbone)
        # Rows past the tokenizer (LLaVA-1.5's 32,002 tokens padded to 32,064 rows) are no token:
        # never generated, as in the reference, whose resize to len(tokenizer) drops them.
        self.tokens = min(len(backbone.tokenizer), self.lm.V)

    def encode(self, req: GenerationRequest) -> Encoded:
        enc = self.encoder.encode(req.messages, [c.tokens for c in req.concepts])
        if enc.num_images != len(req.images):
            raise ValueError(f"the messages hold {enc.num_images} photo(s) but {len(req.images)} were given")
        return enc

    def decoder(self) -> Decoder:
        return Decoder(self)

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest],
                 on_delta: DeltaCallback | None = None) -> list[GenerationResult]:
        """All requests at once, stepped until every one ends; raises the first request's error."""
        dec = Decoder(self)
        results: dict[int, GenerationResult] = {}

        def handle(events: list[Event]) -> None:
            for key, kind, value in events:
                if kind == "error":
                    raise value
                if kind == "delta" and on_delta:
                    on_delta(key, value)
                elif kind == "done":
                    results[key] = value

        handle(dec.admit(dict(enumerate(requests))))
        while len(dec):
            handle(dec.step())
        return [results[i] for i in range(len(requests))]
