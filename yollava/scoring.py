"""Scoring rows: per-row sums of the log-probabilities of their labelled (answer) tokens.

One path for training (with gradient), evaluation and the pretraining probes
(without): encode -> pad -> concept table -> embed -> hidden -> log-probs at
labelled positions only. Recognition compares log p("Yes") with log p("No").
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from yollava.batching import Batch, pad
from yollava.concept_model import ConceptLM, ConceptRows, ConceptTable
from yollava.metrics import yes_no_from_logprobs
from yollava.prompt import IGNORE_INDEX, Encoded, Message, PromptEncoder


def labelled_logprobs(lm: ConceptLM, hidden: Tensor, labels: Tensor, table: ConceptTable
                      ) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the labelled next tokens.

    hidden (B, T, d) predicts labels shifted by one. Logits are computed only at
    labelled positions (answers are a small part of a prompt with a photo).
    Returns (logp (N,), row (N,)) for the N labelled tokens.
    """
    target = labels[:, 1:]  # (B, T-1)
    rows, pos = (target != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,), (N,)
    logits = lm.logits(hidden[rows, pos].unsqueeze(1), table.select(rows))[:, 0]  # (N, V + S)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, target[rows, pos].unsqueeze(1)).squeeze(1), rows


def score_batch(lm: ConceptLM, batch: Batch, table: ConceptTable, image_features: Tensor | None = None,
                start: int = 0, cache=None) -> Tensor:
    """(B,) per-row sums of labelled log-probs of a padded batch.

    With `start` > 0 the batch holds the rows from `start` on and `cache` the
    keys/values of the first `start` tokens, shared (see the trainer's prefix).
    """
    x = lm.embed(batch.ids, table, image_features, batch.image_mask)
    if start:
        B, T = batch.ids.shape
        mask = torch.cat([torch.ones(B, start, dtype=batch.mask.dtype, device=batch.mask.device), batch.mask], 1)
        pos = start + torch.arange(T, device=batch.ids.device).expand(B, T)  # (B, T)
        h, _ = lm.hidden(x, mask, pos, cache, use_cache=True)
    else:
        h, _ = lm.hidden(x, batch.mask)
    logp, rows = labelled_logprobs(lm, h, batch.labels, table)
    return torch.zeros(batch.ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


def score_rows(lm: ConceptLM, encs: Sequence[Encoded], concepts: Sequence[Sequence[ConceptRows]],
               image_features: Tensor | None = None, start: int = 0, cache=None) -> Tensor:
    """(B,) per-row sums of answer log-probs; differentiable in the concept rows unless under no_grad.

    `concepts[b]` are row b's concepts in slot order; `image_features`
    (n_photos, n_img, d) fill the image slots of all rows in order.
    """
    bb = lm.backbone
    batch = pad(encs, start=start, device=bb.device)
    table = ConceptTable.build(concepts, bb.hidden_size, bb.dtype, bb.device)
    return score_batch(lm, batch, table, image_features, start, cache)


def encode_candidates(encoder: PromptEncoder, messages: Sequence[Message], candidates: Sequence[str],
                      concepts: Sequence[ConceptRows]) -> list[Encoded]:
    """The conversation once per candidate answer, the closing `</s>` not scored,
    so "Yes" and "Yes, it is." compare by their words alone."""
    tokens = [c.tokens for c in concepts]
    encs = []
    for cand in candidates:
        e = encoder.encode([*messages, Message("assistant", cand)], tokens)
        e.labels[-1] = IGNORE_INDEX  # the EOS
        encs.append(e)
    return encs


@torch.no_grad()
def answer_logprobs(lm: ConceptLM, encoder: PromptEncoder, messages: Sequence[Message],
                    candidates: Sequence[str], concepts: Sequence[ConceptRows],
                    image_features: Tensor | None = None) -> Tensor:
    """Sum of log p(answer tokens | conversation) for each candidate answer -> (C,).

    `messages` ends with the user turn; `image_features` (n_photos, n_img, d)
    are the photos the conversation carries, in order.
    """
    encs = encode_candidates(encoder, messages, candidates, concepts)
    feats = None
    if image_features is not None:  # every candidate row carries the same photos
        feats = image_features.unsqueeze(0).expand(len(encs), *image_features.shape)  # (C, n_photos, n_img, d)
    return score_rows(lm, encs, [list(concepts)] * len(encs), feats)


def says_yes(lm: ConceptLM, encoder: PromptEncoder, question: str, concepts: Sequence[ConceptRows],
             image_features: Tensor | None) -> tuple[bool, float]:
    """(yes?, log p(Yes) - log p(No)) for a yes/no question about one photo; NaN scores raise."""
    n = 0 if image_features is None else image_features.shape[0]
    lp = answer_logprobs(lm, encoder, [Message("user", question, images=n)], ["Yes", "No"], concepts,
                         image_features)
    yes, no = float(lp[0]), float(lp[1])
    return yes_no_from_logprobs(yes, no), yes - no
