"""Concept tokens as virtual ids over a frozen LLaVA: nothing in the model changes.

Embedding: ids < V gather base rows; ids >= V gather row `id - V` of that
sequence's concept table. Output: `cat(h @ W_head.T, h @ concept_head.T)`,
with each sequence's own concept rows. This is the arithmetic of
`add_tokens` + `resize_token_embeddings`, per sequence, without the resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from yollava.backbone import Backbone
from yollava.tokens import ConceptTokens


@dataclass
class ConceptRows:
    """One subject's trainable rows: identifier first, then the k latents."""

    tokens: ConceptTokens
    embed: Tensor  # (k+1, d)
    head: Tensor  # (k+1, d)

    def __post_init__(self) -> None:
        want = (self.tokens.num_tokens,)
        for field in ("embed", "head"):
            t = getattr(self, field)
            if t.dim() != 2 or t.shape[:1] != want:
                raise ValueError(f"{field} of concept {self.tokens.name!r} has shape "
                                 f"{tuple(t.shape)}; expected ({want[0]}, d)")


@dataclass
class ConceptTable:
    """Per-sequence concept rows of a batch, padded to the widest row."""

    embed: Tensor  # (B, S, d)
    head: Tensor  # (B, S, d)
    valid: Tensor  # (B, S) bool: a real slot of that sequence
    generatable: Tensor  # (B, S) bool: an identifier slot (latents are never generated)

    @property
    def num_slots(self) -> int:
        return self.embed.shape[1]

    def select(self, rows: Tensor) -> "ConceptTable":
        """The table of batch rows `rows` (N,), e.g. one entry per scored token."""
        return ConceptTable(self.embed[rows], self.head[rows], self.valid[rows], self.generatable[rows])

    @classmethod
    def build(cls, rows: Sequence[Sequence[ConceptRows]], hidden_size: int,
              dtype: torch.dtype, device: torch.device | str) -> "ConceptTable":
        """Stack each sequence's concepts (in slot order); differentiable in the rows."""
        B = len(rows)
        S = max((sum(c.tokens.num_tokens for c in r) for r in rows), default=0)
        embed, head = [], []
        valid = torch.zeros(B, S, dtype=torch.bool, device=device)
        generatable = torch.zeros(B, S, dtype=torch.bool, device=device)
        for b, concepts in enumerate(rows):
            e = [c.embed.to(device, dtype) for c in concepts]
            h = [c.head.to(device, dtype) for c in concepts]
            n = 0
            for c in concepts:
                if c.embed.shape[1] != hidden_size:
                    raise ValueError(f"concept {c.tokens.name!r} has width {c.embed.shape[1]}; "
                                     f"this backbone's hidden size is {hidden_size}")
                generatable[b, n] = True
                n += c.tokens.num_tokens
            valid[b, :n] = True
            pad = torch.zeros(S - n, hidden_size, dtype=dtype, device=device)
            embed.append(torch.cat([*e, pad]))  # (S, d)
            head.append(torch.cat([*h, pad]))
        if B == 0 or S == 0:
            z = torch.zeros(B, 0, hidden_size, dtype=dtype, device=device)
            return cls(z, z, valid, generatable)
        return cls(torch.stack(embed), torch.stack(head), valid, generatable)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Left-padding-aware position ids: (B, T) mask -> (B, T) positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ConceptLM:
    """Runs a frozen LLaVA with per-sequence concept tokens."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.V = backbone.vocab_size

    def embed(self, ids: Tensor, table: ConceptTable, image_features: Tensor | None = None,
              image_mask: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T, d) input embeddings; photos scattered into `image_mask`."""
        V, S = self.V, table.num_slots
        virtual = ids >= V  # (B, T)
        if bool((ids >= V + S).any()) or bool((ids < 0).any()):
            bad = ids[(ids >= V + S) | (ids < 0)][0].item()
            raise ValueError(f"token id {bad} is outside the base vocabulary ({V}) "
                             f"and this batch's {S} concept slots")
        x = self.backbone.embed_tokens(ids.masked_fill(virtual, 0))  # (B, T, d)
        if S:
            slot = (ids - V).clamp(min=0)  # (B, T)
            d = x.shape[-1]
            rows = torch.gather(table.embed, 1, slot.unsqueeze(-1).expand(-1, -1, d))  # (B, T, d)
            x = torch.where(virtual.unsqueeze(-1), rows.to(x.dtype), x)
        if image_mask is not None and bool(image_mask.any()):
            if image_features is None:
                raise ValueError("the prompt has image slots but no image features were given")
            feats = image_features.reshape(-1, x.shape[-1])  # (N*n_img, d)
            if feats.shape[0] != int(image_mask.sum()):
                raise ValueError(f"{int(image_mask.sum())} image slots but {feats.shape[0]} image feature rows")
            x = x.masked_scatter(image_mask.unsqueeze(-1), feats.to(x.dtype))
        return x

    def hidden(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
               cache=None, use_cache: bool = False):
        """Language model over embeddings: (B, T, d) -> ((B, T, d), cache)."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -inputs_embeds.shape[1]:]
        out = self.backbone.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                           position_ids=position_ids, cache=cache, use_cache=use_cache)
        return out.last_hidden_state, out.cache

    def logits(self, hidden: Tensor, table: ConceptTable) -> Tensor:
        """(B, T, d) -> (B, T, V + S): base head, then this sequence's concept rows."""
        base = self.backbone.lm_head(hidden)  # (B, T, V)
        if not table.num_slots:
            return base
        extra = torch.einsum("btd,bsd->bts", hidden, table.head.to(hidden.dtype))  # (B, T, S)
        extra = extra.masked_fill(~table.valid.unsqueeze(1), float("-inf"))
        return torch.cat([base, extra], dim=-1)

    def forward(self, ids: Tensor, attention_mask: Tensor, table: ConceptTable,
                image_features: Tensor | None = None, image_mask: Tensor | None = None) -> Tensor:
        """Full-sequence logits (B, T, V + S), no cache."""
        x = self.embed(ids, table, image_features, image_mask)
        h, _ = self.hidden(x, attention_mask)
        return self.logits(h, table)

    __call__ = forward
