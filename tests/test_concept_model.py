import torch

from tests.conftest import random_photo, random_rows
from yollava.concept_model import ConceptLM, ConceptRows, ConceptTable
from yollava.prompt import Message, PromptEncoder


def test_frozen_base_untouched_and_grads_only_on_concept_rows(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    bo = random_rows(tiny, "bo")
    rows = ConceptRows(bo.tokens, bo.embed.clone().requires_grad_(), bo.head.clone().requires_grad_())
    enc = PromptEncoder.for_backbone(tiny).encode(
        [Message("user", "Is <bo> here?", 1), Message("assistant", "Yes, <bo> is here.")], [rows.tokens])
    ids = torch.tensor([enc.ids])
    labels = torch.tensor([enc.labels])
    table = ConceptTable.build([[rows]], tiny.hidden_size, tiny.dtype, "cpu")
    feats = tiny.image_features(tiny.preprocess([random_photo()]))
    logits = ConceptLM(tiny)(ids, torch.ones_like(ids), table, feats, torch.tensor([enc.image_mask]))
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    loss.backward()

    assert all(p.grad is None for p in tiny.model.parameters())
    assert rows.embed.grad is not None and rows.embed.grad.abs().sum() > 0
    assert rows.head.grad is not None and rows.head.grad[0].abs().sum() > 0  # identifier is a target
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tiny.embed_tokens.weight.shape[0] == tiny.vocab_size == len(tiny.tokenizer)


def test_typed_specials_stay_text(tiny):
    """`<image>`, `</s>`, a latent's text and an unknown `<name>` never become embeddings."""
    enc = PromptEncoder.for_backbone(tiny)
    bo = random_rows(tiny, "bo")
    text = "look <image> here </s> and <bo_3> and <mam> and <bo>"
    e = enc.encode([Message("user", text)], [bo.tokens])
    V = tiny.vocab_size
    assert not any(e.image_mask)
    assert tiny.image_token_id not in e.ids
    assert tiny.tokenizer.eos_token_id not in e.ids
    virtual = [i for i in e.ids if i >= V]
    # definition: identifier + k latents; the typed mention: the identifier only
    assert virtual == [V, *range(V + 1, V + bo.tokens.num_tokens), V]
    assert "<image>" in tiny.tokenizer.decode([i for i in e.ids if i < V])


def test_unknown_virtual_id_is_refused(tiny):
    import pytest

    table = ConceptTable.build([[]], tiny.hidden_size, tiny.dtype, "cpu")
    with pytest.raises(ValueError, match="outside the base vocabulary"):
        ConceptLM(tiny).embed(torch.tensor([[1, tiny.vocab_size]]), table)


def test_prefix_len_covers_system_and_photo(tiny):
    enc = PromptEncoder.for_backbone(tiny)
    a = enc.encode([Message("user", "Is <bo> here?", 1)], [random_rows(tiny, "bo").tokens])
    b = enc.encode([Message("user", "Is <mam> here?", 1)], [random_rows(tiny, "mam").tokens])
    assert a.ids[:a.prefix_len] == b.ids[:b.prefix_len]
    # the prefix ends with the photo's slots and the newline after them, never inside a definition
    last_image = max(i for i, m in enumerate(a.image_mask) if m)
    assert last_image < a.prefix_len and all(i < tiny.vocab_size for i in a.ids[:a.prefix_len])
    assert a.ids[a.prefix_len] == tiny.vocab_size  # the definition starts right after


def test_labels_cover_answers_only(tiny):
    enc = PromptEncoder.for_backbone(tiny)
    e = enc.encode([Message("user", "Q1"), Message("assistant", "A one"), Message("user", "Q2"),
                    Message("assistant", "B")])
    labelled = [i for i, l in zip(e.ids, e.labels) if l != -100]
    assert labelled.count(tiny.tokenizer.eos_token_id) == 2
    text = tiny.tokenizer.decode(labelled, skip_special_tokens=True)
    assert text == " A one B"
