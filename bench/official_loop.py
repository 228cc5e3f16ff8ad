"""A faithful re-implementation of the official Yo'LLaVA training loop, for benchmarks.

One subject at a time: add the k+1 tokens (resize the vocabulary), make the
whole input embedding and output head trainable, batch size 1, the vision
tower run on every step, AdamW over both whole matrices, and after every step
the rows of all other tokens restored from a saved copy.
"""

from __future__ import annotations

import copy
import random

import torch
from PIL import ImageOps

from yollava.prompt import PromptEncoder
from yollava.recipe import RecipeConfig, TrainingSet
from yollava.tokens import ConceptTokens


def train_official(backbone, ts: TrainingSet, config: RecipeConfig, load_image,
                   init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one subject the official way; returns its (embed, head) rows, (k+1, d) each.

    `init`: the new rows' starting values (else whatever `resize_token_embeddings` gives).
    Samples are shuffled per epoch with the packed trainer's seeding, so that both
    loops see the same order and can be compared row for row.
    """
    model = copy.deepcopy(backbone.model)
    V, n = backbone.vocab_size, config.num_latent + 1
    model.resize_token_embeddings(V + n, mean_resizing=False)  # the new ids are V..V+k, as virtual ids
    if init is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[V:] = init[0]
            model.get_output_embeddings().weight[V:] = init[1]
    model.requires_grad_(False)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embed.requires_grad_(True)
    head.requires_grad_(True)
    opt = torch.optim.AdamW([embed, head], lr=config.lr, weight_decay=config.weight_decay)
    keep = torch.ones(V + n, dtype=torch.bool, device=backbone.device)
    keep[V:] = False  # index_no_updates
    orig_embed, orig_head = embed.detach().clone(), head.detach().clone()
    encoder = PromptEncoder.for_backbone(backbone)
    dev = backbone.device
    tokens = [ConceptTokens(ts.subject, config.num_latent)]
    for epoch in range(1, config.epochs + 1):
        samples = ts.train[:]
        random.Random(f"{config.seed}:{ts.subject}:{epoch}").shuffle(samples)
        for s in samples:
            enc = encoder.encode(s.messages, tokens)
            ids = torch.tensor([enc.ids], device=dev)
            pixel_values = None
            if s.photo is not None:
                im = load_image(s.photo.key).convert("RGB")
                im = ImageOps.mirror(im) if s.photo.flip else im
                pixel_values = backbone.preprocess([im]).to(dev, backbone.dtype)
            out = model(input_ids=ids, pixel_values=pixel_values, labels=torch.tensor([enc.labels], device=dev))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                embed[keep] = orig_embed[keep]
                head[keep] = orig_head[keep]
    return embed.detach()[V:].clone(), head.detach()[V:].clone()
