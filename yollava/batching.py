"""Right-padded batches of encoded sequences, and the loss/score on their labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from yollava.concept_model import ConceptLM, ConceptTable
from yollava.prompt import IGNORE_INDEX, Encoded


@dataclass
class Batch:
    ids: Tensor  # (B, T)
    mask: Tensor  # (B, T) 1 = real token
    labels: Tensor  # (B, T), IGNORE_INDEX where not trained
    image_mask: Tensor  # (B, T) bool


def right_pad(seqs: Sequence[Encoded], start: int = 0, pad_id: int = 0, device="cpu") -> Batch:
    """Pad `seq[start:]` of every sequence on the right."""
    T = max(len(s) - start for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s) - start
        ids[b, :n] = torch.tensor(s.ids[start:])
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(s.labels[start:])
        image_mask[b, :n] = torch.tensor(s.image_mask[start:], dtype=torch.bool)
    return Batch(ids.to(device), mask.to(device), labels.to(device), image_mask.to(device))


def token_logprobs(lm: ConceptLM, hidden: Tensor, labels: Tensor, table: ConceptTable) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the labelled next tokens.

    hidden (B, T, d) predicts labels shifted by one. Logits are computed only at
    labelled positions (answers are a small part of a prompt with a photo).
    Returns (logp (N,), row (N,)) for the N labelled tokens.
    """
    target = labels[:, 1:]  # (B, T-1)
    rows, pos = (target != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,), (N,)
    h = hidden[rows, pos]  # (N, d)
    base = lm.backbone.lm_head(h)  # (N, V)
    if table.num_slots:
        head = table.head[rows].to(h.dtype)  # (N, S, d)
        extra = torch.einsum("nd,nsd->ns", h, head).masked_fill(~table.valid[rows], float("-inf"))
        base = torch.cat([base, extra], dim=-1)  # (N, V + S)
    logp = torch.log_softmax(base.float(), dim=-1)
    return logp.gather(1, target[rows, pos].unsqueeze(1)).squeeze(1), rows
