import copy

import numpy as np
import pytest
import torch
from PIL import Image

from yollava.backbone import load_backbone
from yollava.concept_model import ConceptRows
from yollava.tokens import ConceptTokens


@pytest.fixture(scope="session")
def tiny():
    return load_backbone("tiny")


def random_rows(backbone, name, k=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    d = backbone.hidden_size
    std_e = backbone.embed_tokens.weight.std().item() * scale
    std_h = backbone.lm_head.weight.std().item() * scale
    tokens = ConceptTokens(name, k)
    return ConceptRows(tokens, torch.randn(k + 1, d, generator=g) * std_e,
                       torch.randn(k + 1, d, generator=g) * std_h)


def random_photo(seed=0, size=40):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def reference_model(backbone, concepts):
    """The reference way: add_tokens + resize_token_embeddings, rows copied in."""
    tok = copy.deepcopy(backbone.tokenizer)
    model = copy.deepcopy(backbone.model)
    strings = [s for c in concepts for s in c.tokens.strings]
    tok.add_tokens(strings)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for c in concepts:
            ids = tok.convert_tokens_to_ids(c.tokens.strings)
            model.get_input_embeddings().weight[ids] = c.embed.to(model.dtype)
            model.get_output_embeddings().weight[ids] = c.head.to(model.dtype)
    model.eval()
    return model, tok
