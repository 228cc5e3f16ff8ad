"""Padded batches of encoded sequences: one helper for both sides.

Training and scoring pad on the right (positions count from the start);
decoding pads on the left (every row's next token lands in the last column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from yollava.prompt import IGNORE_INDEX, Encoded


@dataclass
class Batch:
    ids: Tensor  # (B, T)
    mask: Tensor  # (B, T) 1 = real token
    labels: Tensor  # (B, T), IGNORE_INDEX where not trained
    image_mask: Tensor  # (B, T) bool


def pad(seqs: Sequence[Encoded], side: Literal["right", "left"] = "right", start: int = 0, pad_id: int = 0,
        device: torch.device | str = "cpu") -> Batch:
    """Pad `seq[start:]` of every sequence to the longest, on `side`."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r} must be 'right' or 'left'")
    T = max(len(s) - start for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s) - start
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, cols] = torch.tensor(s.ids[start:], dtype=torch.long)
        mask[b, cols] = 1
        labels[b, cols] = torch.tensor(s.labels[start:], dtype=torch.long)
        image_mask[b, cols] = torch.tensor(s.image_mask[start:], dtype=torch.bool)
    return Batch(ids.to(device), mask.to(device), labels.to(device), image_mask.to(device))
