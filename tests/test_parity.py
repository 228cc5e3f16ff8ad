"""Virtual ids vs the reference way (add_tokens + resize_token_embeddings).

Each test runs on the tiny backbone (byte-level BPE, 16 image tokens) and on
the LLaVA-1.5-shaped checkpoint with the real Llama 2 tokenizer (32,064 rows,
576 image tokens). On the latter the reference's resize to len(tokenizer)
drops the padding rows 32,002..32,063 and gives the concept tokens ids from
32,002: columns are compared by token, and the padding columns (no token)
are not generated (`Generator`).
"""

import pytest
import torch

from tests.conftest import random_photo, random_rows, reference_model
from tests.real_vocab import llava15_backbone
from yollava.batching import pad
from yollava.concept_model import ConceptLM, ConceptTable
from yollava.generate import GenerationRequest, Generator, SamplingParams
from yollava.prompt import SYSTEM_PROMPT, Message, PromptEncoder


def reference_prompt(backbone, concepts, question, images):
    parts = [f"{SYSTEM_PROMPT} USER: "]
    parts += [("<image>" * backbone.num_image_tokens) + "\n" for _ in range(images)]
    parts += [c.tokens.definition() + "\n" for c in concepts]
    parts.append(f"{question} ASSISTANT:")
    return "".join(parts)


def reference_ids(backbone, tok, concepts, question, images):
    text = reference_prompt(backbone, concepts, question, images)
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def to_reference(ids, backbone, tok, concepts):
    strings = [s for c in concepts for s in c.tokens.strings]
    V = backbone.vocab_size
    return [i if i < V else tok.convert_tokens_to_ids(strings[i - V]) for i in ids]


def compared_columns(backbone, tok, concepts):
    """(our columns, the reference's columns) of the same tokens: every token of the
    tokenizer, then each concept token (not the padding rows past the tokenizer)."""
    n, V = len(backbone.tokenizer), backbone.vocab_size
    virtual = list(range(V, V + sum(c.tokens.num_tokens for c in concepts)))
    return list(range(n)) + virtual, list(range(n)) + to_reference(virtual, backbone, tok, concepts)


@pytest.fixture(params=["tiny", "llava15"], scope="module")
def bb(request, tiny):
    return tiny if request.param == "tiny" else llava15_backbone()


CASES = {
    "one concept, photo": (["bo"], "Is <bo> in this photo?", 1),
    "two concepts, one prompt": (["bo", "mam"], "Is <bo> next to <mam>?", 1),
    "text only": (["bo"], "What colour is <bo>?", 0),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_parity(bb, case):
    tiny = bb
    names, question, images = CASES[case]
    concepts = [random_rows(tiny, n, seed=i + 1, scale=3) for i, n in enumerate(names)]
    ref, tok = reference_model(tiny, concepts)
    enc = PromptEncoder.for_backbone(tiny).encode([Message("user", question, images)],
                                                  [c.tokens for c in concepts])
    rids = reference_ids(tiny, tok, concepts, question, images)
    assert to_reference(enc.ids, tiny, tok, concepts) == rids  # same tokenization

    pv = tiny.preprocess([random_photo(3)]) if images else None
    ids = torch.tensor([enc.ids])
    table = ConceptTable.build([concepts], tiny.hidden_size, tiny.dtype, "cpu")
    with torch.no_grad():
        feats = tiny.image_features(pv) if images else None
        ours = ConceptLM(tiny)(ids, torch.ones_like(ids), table, feats, torch.tensor([enc.image_mask]))
        theirs = ref(input_ids=torch.tensor([rids]), pixel_values=pv).logits
    mine, cols = compared_columns(tiny, tok, concepts)
    assert ours.shape[-1] == tiny.vocab_size + table.num_slots
    assert theirs.shape[-1] == len(tok)  # the reference has a column for every token and nothing else
    assert (ours[0][:, mine] - theirs[0][:, cols]).abs().max().item() <= 1e-5


def test_batch_of_different_concepts_parity(bb):
    """Each row of a mixed batch equals that row alone on a reference model with its concepts."""
    tiny = bb
    bo, mam, cat = (random_rows(tiny, n, seed=i, scale=3) for i, n in enumerate(["bo", "mam", "cat"]))
    rows = [([bo], "Is <bo> here?", 1), ([mam, cat], "Do <cat> and <mam> play?", 0), ([], "Hello there", 1)]
    enc = PromptEncoder.for_backbone(tiny)
    encs = [enc.encode([Message("user", q, n)], [c.tokens for c in cs]) for cs, q, n in rows]
    batch = pad(encs, side="left", pad_id=tiny.tokenizer.pad_token_id or 0)
    ids, mask, image_mask = batch.ids, batch.mask, batch.image_mask
    photos = [random_photo(10), random_photo(11)]
    table = ConceptTable.build([cs for cs, _, _ in rows], tiny.hidden_size, tiny.dtype, "cpu")
    with torch.no_grad():
        feats = tiny.image_features(tiny.preprocess(photos))
        ours = ConceptLM(tiny)(ids, mask, table, feats, image_mask)
    photo_of = {0: photos[0], 2: photos[1]}
    for b, (cs, q, n) in enumerate(rows):
        ref, tok = reference_model(tiny, cs)
        rids = reference_ids(tiny, tok, cs, q, n)
        pv = tiny.preprocess([photo_of[b]]) if n else None
        with torch.no_grad():
            theirs = ref(input_ids=torch.tensor([rids]), pixel_values=pv).logits[0]
        width = tiny.vocab_size + sum(c.tokens.num_tokens for c in cs)
        mine, cols = compared_columns(tiny, tok, cs)
        assert enc.encode([Message("user", q, n)], [c.tokens for c in cs]).ids == \
            [i for i, m in zip(ids[b].tolist(), mask[b].tolist()) if m]  # padding aside, the row's own ids
        assert to_reference(ids[b, -len(rids):].tolist(), tiny, tok, cs) == rids
        assert (ours[b, -len(rids):][:, mine] - theirs[:, cols]).abs().max().item() <= 1e-5
        assert torch.isinf(ours[b, -1, width:]).all()  # no other row's concepts are reachable


@pytest.mark.parametrize("names", [["bo"], ["bo", "mam"]])
def test_greedy_generation_parity(bb, names):
    """Same greedy tokens as HF generate on the resized reference (latents suppressed)."""
    tiny = bb
    concepts = [random_rows(tiny, n, seed=i + 5, scale=4) for i, n in enumerate(names)]
    question = "Tell me about " + " and ".join(f"<{n}>" for n in names) + "."
    ref, tok = reference_model(tiny, concepts)
    rids = reference_ids(tiny, tok, concepts, question, 1)
    photo = random_photo(7)
    latents = [tok.convert_tokens_to_ids(s) for c in concepts for s in c.tokens.latents]
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([rids]), pixel_values=tiny.preprocess([photo]),
                           max_new_tokens=24, do_sample=False, suppress_tokens=latents,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    theirs = out[0, len(rids):].tolist()
    if theirs and theirs[-1] == tok.eos_token_id:
        theirs = theirs[:-1]
    res = Generator(tiny).generate([GenerationRequest([Message("user", question, 1)], concepts, [photo],
                                                      SamplingParams(max_new_tokens=24))])[0]
    assert to_reference(res.token_ids, tiny, tok, concepts) == theirs
    ident = {tok.convert_tokens_to_ids(c.tokens.strings[0]) for c in concepts}
    if ident & set(theirs):  # identifiers generated: they decode back to their names
        assert any(f"<{n}>" in res.text for n in names)
