"""The throughput benchmark compares like with like: on a tiny case the packed trainer (batch 1, one
subject) ends with the same rows as the official loop (resize, whole matrices trained, rows restored)."""

import torch

from bench.official_loop import train_official
from tests.conftest import random_photo
from yollava.recipe import RecipeConfig, build_training_set
from yollava.trainer import ConceptBank, PackedTrainer


def test_packed_rows_equal_the_official_loops_rows(tiny):
    photos = {f"p{i}": random_photo(i, size=36) for i in range(8)}
    cfg = RecipeConfig(num_latent=3, hard_negatives=2, easy_negatives=2, positive_questions=1,
                       attribute_questions=2, epochs=2, batch_size=1, lr=1e-2, holdout=0.0, flip=False)
    ts = build_training_set("bo", ["p0", "p1"], ["p2", "p3"], ["p4", "p5"],
                            [("What colour is {c}?", "It is red."), ("What shape is {c}?", "Round.")], cfg)
    bank = ConceptBank(tiny, seed=0)
    bank.add("bo", cfg.num_latent)
    start = bank.snapshot("bo")
    PackedTrainer(tiny, cfg, photos.__getitem__, progress=False).fit([ts], bank=bank)
    embed, head = train_official(tiny, ts, cfg, photos.__getitem__, init=(start.embed, start.head))
    assert not torch.allclose(embed, start.embed)  # the rows moved
    torch.testing.assert_close(bank.embed["bo"].detach(), embed, rtol=0, atol=1e-5)
    torch.testing.assert_close(bank.head["bo"].detach(), head, rtol=0, atol=1e-5)
