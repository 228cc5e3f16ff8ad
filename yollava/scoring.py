"""Likelihood of candidate answers: recognition by comparing "Yes" against "No"."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from yollava.batching import right_pad, token_logprobs
from yollava.concept_model import ConceptLM, ConceptRows, ConceptTable
from yollava.prompt import Message, PromptEncoder


@torch.no_grad()
def answer_logprobs(lm: ConceptLM, encoder: PromptEncoder, messages: Sequence[Message],
                    candidates: Sequence[str], concepts: Sequence[ConceptRows],
                    image_features: Tensor | None = None) -> Tensor:
    """Sum of log p(answer tokens | conversation) for each candidate answer -> (C,).

    `messages` ends with the user turn; `image_features` (n_photos, n_img, d)
    are the photos that turn carries. The closing `</s>` is not scored, so
    "Yes" and "Yes, it is." compare by their words alone.
    """
    tokens = [c.tokens for c in concepts]
    encs = []
    for cand in candidates:
        e = encoder.encode([*messages, Message("assistant", cand)], tokens)
        e.labels[-1] = -100  # the EOS
        encs.append(e)
    dev = lm.backbone.device
    batch = right_pad(encs, pad_id=0, device=dev)
    table = ConceptTable.build([list(concepts)] * len(encs), lm.backbone.hidden_size, lm.backbone.dtype, dev)
    feats = None
    if image_features is not None:
        feats = image_features.unsqueeze(0).expand(len(encs), *image_features.shape)  # (C, n_photos, n_img, d)
    x = lm.embed(batch.ids, table, feats, batch.image_mask)
    h, _ = lm.hidden(x, batch.mask)
    logp, rows = token_logprobs(lm, h, batch.labels, table)
    return torch.zeros(len(encs), device=logp.device).index_add_(0, rows, logp)


def says_yes(lm: ConceptLM, encoder: PromptEncoder, question: str, concepts: Sequence[ConceptRows],
             image_features: Tensor | None) -> tuple[bool, float]:
    """(yes?, log p(Yes) - log p(No)) for a yes/no question about one photo."""
    n = 0 if image_features is None else image_features.shape[0]
    lp = answer_logprobs(lm, encoder, [Message("user", question, images=n)], ["Yes", "No"], concepts,
                         image_features)
    margin = float(lp[0] - lp[1])
    return margin > 0, margin
