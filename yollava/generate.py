"""Batched decoding with a KV cache and per-sequence concepts and photos.

Each request brings its own messages, concepts, photos and sampling settings;
all are decoded together, left-padded, one forward pass per new token. Latent
concept tokens are never generated; identifiers may be, and decode to `<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from yollava.backbone import Backbone
from yollava.batching import pad
from yollava.concept_model import ConceptLM, ConceptRows, ConceptTable, positions_from_mask
from yollava.prompt import Encoded, Message, PromptEncoder


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
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class GenerationRequest:
    messages: list[Message]
    concepts: list[ConceptRows] = field(default_factory=list)
    images: list = field(default_factory=list)  # PIL images, in the order the turns use them
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int


DeltaCallback = Callable[[int, str], None]  # (request index, new text)


class _Row:
    """Decoding state of one request."""

    def __init__(self, enc: Encoded, params: SamplingParams, device):
        self.enc, self.params = enc, params
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def stable_len(self) -> int:
        """Text that no stop string can still claim and no split character can change."""
        hold = max((len(s) - 1 for s in self.params.stop), default=0)
        n = len(self.text) - hold
        while n > 0 and self.text[n - 1] == "\ufffd":
            n -= 1
        return max(n, self.emitted)


class Generator:
    def __init__(self, backbone: Backbone, encoder: PromptEncoder | None = None):
        self.backbone = backbone
        self.lm = ConceptLM(backbone)
        self.encoder = encoder or PromptEncoder.for_backbone(backbone)

    def encode(self, req: GenerationRequest) -> Encoded:
        enc = self.encoder.encode(req.messages, [c.tokens for c in req.concepts])
        if enc.num_images != len(req.images):
            raise ValueError(f"the messages hold {enc.num_images} photo(s) but {len(req.images)} were given")
        return enc

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest],
                 on_delta: DeltaCallback | None = None) -> list[GenerationResult]:
        bb, dev = self.backbone, self.backbone.device
        encs = [self.encode(r) for r in requests]
        rows = [_Row(e, r.params, dev) for e, r in zip(encs, requests)]
        batch = pad(encs, side="left", pad_id=bb.tokenizer.pad_token_id or 0, device=dev)
        ids, mask, image_mask = batch.ids, batch.mask, batch.image_mask
        photos = [im for r in requests for im in r.images]
        feats = bb.image_features(bb.preprocess(photos)) if photos else None  # (N, n_img, d)
        table = ConceptTable.build([r.concepts for r in requests], bb.hidden_size, bb.dtype, dev)
        latent = table.valid & ~table.generatable  # (B, S)

        x = self.lm.embed(ids, table, feats, image_mask)
        h, cache = self.lm.hidden(x, mask, use_cache=True)
        pos = positions_from_mask(mask)[:, -1:]  # (B, 1)
        for step in range(max(r.params.max_new_tokens for r in rows)):
            logits = self.lm.logits(h[:, -1:], table)[:, 0].float()  # (B, V + S)
            logits[:, self.lm.V:] = logits[:, self.lm.V:].masked_fill(latent, float("-inf"))
            width = (self.lm.V + table.valid.sum(1)).tolist()  # this row's own columns
            nxt = [self._choose(logits[b, :width[b]], row) if row.finish is None
                   else bb.tokenizer.pad_token_id or 0 for b, row in enumerate(rows)]
            for b, row in enumerate(rows):
                if row.finish is None:
                    self._advance(b, row, nxt[b], requests[b], on_delta)
            if all(r.finish is not None for r in rows):
                break
            step_ids = torch.tensor(nxt, device=dev).unsqueeze(1)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            pos = pos + 1
            h, cache = self.lm.hidden(self.lm.embed(step_ids, table), mask, pos, cache, use_cache=True)
        return [GenerationResult(r.text, r.ids, r.finish or "length", len(r.enc)) for r in rows]

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
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=row.gen))

    def _advance(self, b: int, row: _Row, token: int, req: GenerationRequest,
                 on_delta: DeltaCallback | None) -> None:
        if token == self.backbone.tokenizer.eos_token_id:
            row.finish = "stop"
        else:
            row.ids.append(token)
            row.text = self.encoder.decode(row.ids, [c.tokens for c in req.concepts])
            hits = [i for i in (row.text.find(s) for s in row.params.stop) if i >= 0]
            if hits:
                row.text, row.finish = row.text[:min(hits)], "stop"
            elif len(row.ids) >= row.params.max_new_tokens:
                row.finish = "length"
        end = len(row.text) if row.finish else row.stable_len()
        if on_delta and end > row.emitted:
            on_delta(b, row.text[row.emitted:end])
        row.emitted = max(row.emitted, end)
