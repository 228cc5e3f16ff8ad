"""The real LLaVA-1.5 vocabulary: checkpoint layout, prompt encoding and decoding against the reference.

The reference is what the official code does: `tokenizer.add_tokens(concept
tokens)`, then the whole prompt tokenized as one string (`<image>` expanded to
576 image tokens as the HF processor does). Typed `<image>`, `</s>` or
`<bo_3>` stay text in this project (ADR 001): for prompts holding such text the
reference tokenizes the same string with the structural tokens as added
markers and `split_special_tokens=True`, and that construction is checked
against the plain one on every prompt both apply to.
"""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoProcessor, PreTrainedTokenizerFast

from tests.conftest import random_photo, random_rows
from tests.real_vocab import REAL_TOKENIZER, llava15_backbone, llava15_folder
from yollava.backbone import fingerprint_weights
from yollava.checkpoints import (IMAGE_TOKEN_ID, PAD_TOKEN_ID, REAL_VOCAB_ROWS, SHAPES, CheckpointError,
                                 build_llava15, build_llava15_backbone, install_in_hub_cache,
                                 load_llava15_tokenizer)
from yollava.generate import GenerationRequest, Generator, SamplingParams
from yollava.prompt import MARK_PREFIX, SYSTEM_PROMPT, Message, PromptEncoder
from yollava.tokens import ConceptTokens

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bb():
    return llava15_backbone()


# -- the checkpoint ------------------------------------------------------------------------


def test_checkpoint_has_the_llava15_layout(bb):
    folder = llava15_folder()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json"} <= {p.name for p in folder.iterdir()}
    assert bb.vocab_size == REAL_VOCAB_ROWS == 32064 and len(bb.tokenizer) == 32002
    assert bb.embed_tokens.weight.shape[0] == 32064
    assert bb.image_token_id == IMAGE_TOKEN_ID == bb.tokenizer.convert_tokens_to_ids("<image>") == 32000
    assert bb.tokenizer.pad_token_id == PAD_TOKEN_ID == 32001
    assert (bb.tokenizer.bos_token_id, bb.tokenizer.eos_token_id) == (1, 2)
    assert bb.num_image_tokens == 576 == SHAPES["tiny"].num_image_tokens
    assert bb.preprocess([random_photo(1)]).shape == (1, 3, 336, 336)
    # save -> load is the same model: the folder's weights are the builder's
    model, _, _ = build_llava15("tiny", REAL_TOKENIZER, seed=0)
    assert fingerprint_weights(model) == bb.fingerprint
    assert fingerprint_weights(build_llava15("tiny", REAL_TOKENIZER, seed=1)[0]) != bb.fingerprint


def test_builder_refuses_another_tokenizer(tmp_path):
    from yollava.tiny import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not the LLaVA-1.5 tokenizer: {'len': 384"):
        load_llava15_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_llava15_tokenizer(tmp_path / "missing")


def test_loads_by_hub_id_from_the_cache_offline(bb, tmp_path):
    """An id already in the user's hub cache loads with HF_HUB_OFFLINE=1; one that is not fails clearly."""
    cache = tmp_path / "hub"
    snapshot = install_in_hub_cache(llava15_folder(), "llava-hf/llava-1.5-tiny-random", cache)
    repo = cache / "models--llava-hf--llava-1.5-tiny-random"
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert (snapshot / "config.json").is_symlink()
    assert (snapshot / "config.json").resolve().parent == (repo / "blobs").resolve()
    code = ("import json\n"
            "from yollava.backbone import BackboneError, load_backbone\n"
            "bb = load_backbone('llava-hf/llava-1.5-tiny-random')\n"
            "try:\n    load_backbone('llava-hf/llava-1.5-13b-hf'); missing = None\n"
            "except BackboneError as e:\n    missing = str(e)\n"
            "print(json.dumps({'fp': bb.fingerprint, 'V': bb.vocab_size, 'n_img': bb.num_image_tokens,\n"
            "                  'tok': len(bb.tokenizer), 'missing': missing}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["fp"], got["V"], got["n_img"], got["tok"]) == (bb.fingerprint, 32064, 576, 32002)
    assert "model='llava-hf/llava-1.5-13b-hf'" in got["missing"] and "no download" in got["missing"]


# -- prompts: the reference ---------------------------------------------------------------------

NAMES = ["bo", "mam", "shiba-yellow", "cat_2", "x9"]
USER = ["Is {a} in this photo?", "{a}, is that you?", "Where is {a}?\n{b} is here.", "({a})", "\"{a}\" and '{b}'",
        "{a}'s toy is red.", "{a}{b}", "{a} {b}", "{a}/{b}", "Look:\n{a}", "\n\n{a}\n", "{a}", "Hi {a}", "{a}!",
        "{a}: a dog.", "café {a} 日本語 😀{b}👍🏽", "{a}\t{b}", "  {a}  ", "...{a}...", "{a}\n",
        "Tell me about {a}, {b} and {c}.", "{a}-ish {b}123", "¿Dónde está {a}? ¡{b}!", "{a}\u200b{b}", "x{a}y",
        "What colour is {a}?", "Hello there", "{a} <zed> {b}"]
ANSWERS = ["Yes, {a} is in this photo.", "{a} is here.", "No, that is not {a}", "I see {a} 😀.", "{a}",
           "It's {a}'s.", "{a}, {b} and {c}!", "Sure:\n{a}\n{b}", "🙂{a}🙂", "Ja, {a} ist hier.", "{a}{b}",
           "  {a}  ", "A: {a}\n\nB: {b}", "naïve {a}…", "{a} 🐕‍🦺"]
TYPED = ["<image>", "</s>", "<s>", "<unk>", "<pad>", "<{n}_3>", "<{n}_1>", "<zed>", "<image>\n", "▁", "<{o}>",
         MARK_PREFIX + "concept|>", MARK_PREFIX + "token-32000|>"]  # (the encoder's own markers, typed)


def make_case(rng: random.Random):
    names = rng.sample(NAMES, rng.randint(1, 3))
    concepts = [ConceptTokens(n, rng.choice([1, 2, 4, 16])) for n in names]
    others = [n for n in NAMES if n not in names]

    def fill(template: str) -> str:
        return template.format(**{x: f"<{rng.choice(names)}>" for x in "abc"})

    def typed(text: str) -> str:
        if rng.random() < 0.35:
            t = rng.choice(TYPED).format(n=rng.choice(names), o=rng.choice(others))
            pos = rng.randint(0, len(text))
            text = text[:pos] + t + text[pos:]
        return text

    messages, turns = [], rng.randint(1, 3)
    for t in range(turns):
        messages.append(Message("user", typed(fill(rng.choice(USER))), rng.choice([0, 1, 1, 2] if t == 0 else [0, 0, 1])))
        if t < turns - 1 or rng.random() < 0.3:  # sometimes ending on an answer, as training does
            messages.append(Message("assistant", typed(fill(rng.choice(ANSWERS)))))
    return messages, concepts


def official_string(messages, concepts, image_tokens: int, image="<image>", eos="</s>", slot=None):
    """The prompt as the official code writes it (vicuna_v1: system, `USER:`, photos, definitions)."""
    slot = slot or (lambda j: None)
    offsets, n = [], 0
    for c in concepts:
        offsets.append(n)
        n += c.num_tokens

    def strings(c, off):
        return [slot(off + t) or s for t, s in enumerate(c.strings)]

    def mention(text):
        for c, off in zip(concepts, offsets):
            text = text.replace(c.identifier, strings(c, off)[0])
        return text

    s = SYSTEM_PROMPT + " "
    for i, m in enumerate(messages):
        if m.role == "user":
            s += "USER: " + (image * image_tokens + "\n") * m.images
            if i == 0:
                s += "".join(f"{st[0]} is {''.join(st[1:])}.\n" for st in (strings(c, o) for c, o in zip(concepts, offsets)))
            s += mention(m.text) + " ASSISTANT:"
        else:
            s += " " + mention(m.text) + eos
    return s


class Reference:
    """The reference tokenizers of a base tokenizer: concept strings added (the official way),
    and markers for the structural tokens (for prompts that hold typed special text)."""

    def __init__(self, tokenizer, vocab_size: int, image_token_id: int, image_tokens: int, add=None):
        """`add`: how a string becomes an added token (default: as `add_tokens(str)` makes it)."""
        add = add or (lambda s: s)
        self.base, self.V, self.image_id, self.n_img = tokenizer, vocab_size, image_token_id, image_tokens
        self.official = copy.deepcopy(tokenizer)  # every concept string of NAMES added once
        self.official.add_tokens([add(s) for n in NAMES for k in (1, 2, 4, 16) for s in ConceptTokens(n, k).strings])
        self.added = set(self.official.get_added_vocab())
        self.marked = copy.deepcopy(tokenizer)
        self.slots = [f"<|ref-slot-{j}|>" for j in range(3 * 17)]
        self.marked.add_tokens([add(s) for s in ["<|ref-image|>", "<|ref-eos|>", *self.slots]])
        mid = self.marked.convert_tokens_to_ids
        self.from_marker = {mid("<|ref-image|>"): image_token_id, mid("<|ref-eos|>"): tokenizer.eos_token_id,
                            **{mid(s): vocab_size + j for j, s in enumerate(self.slots)}}

    def official_applies(self, messages, concepts) -> bool:
        """No text holds an added token's string other than the sequence's own `<name>` mentions."""
        own = {c.identifier for c in concepts}
        for m in messages:
            text = m.text
            for name in own:
                text = text.replace(name, "")
            if any(a in text for a in self.added):
                return False
        return True

    def official_ids(self, messages, concepts) -> list[int]:
        text = official_string(messages, concepts, self.n_img)
        return [self.base.bos_token_id] + self.official(text, add_special_tokens=False)["input_ids"]

    def to_official(self, ids, concepts) -> list[int]:
        strings = [s for c in concepts for s in c.strings]
        return [i if i < self.V else self.official.convert_tokens_to_ids(strings[i - self.V]) for i in ids]

    def marked_ids(self, messages, concepts) -> list[int]:
        text = official_string(messages, concepts, self.n_img, "<|ref-image|>", "<|ref-eos|>", self.slots.__getitem__)
        ids = self.marked(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [self.base.bos_token_id] + [self.from_marker.get(i, i) for i in ids]


@pytest.fixture(scope="module")
def reference(bb):
    return Reference(bb.tokenizer, bb.vocab_size, bb.image_token_id, bb.num_image_tokens)


CASES = [make_case(random.Random(seed)) for seed in range(320)]


def test_prompt_encoding_equals_the_reference_id_for_id(bb, reference):
    enc = PromptEncoder.for_backbone(bb)
    official = typed = markers = 0
    for messages, concepts in CASES:
        markers += any(MARK_PREFIX in m.text for m in messages)
        ours = enc.encode(messages, concepts)
        where = f"{messages} {[c.name for c in concepts]}"
        assert ours.ids == reference.marked_ids(messages, concepts), where
        assert [i == bb.image_token_id for i in ours.ids] == ours.image_mask
        if reference.official_applies(messages, concepts):
            assert reference.to_official(ours.ids, concepts) == reference.official_ids(messages, concepts), where
            official += 1
        else:
            typed += 1
    assert official >= 150 and typed >= 60 and markers >= 3, (official, typed, markers)  # all paths ran


def test_one_by_one_add_tokens_is_the_shared_reference(bb, reference):
    """A fresh tokenizer per prompt with only its own concept strings added, as the official script
    does, tokenizes as the shared one with all the names added (on prompts it applies to)."""
    enc = PromptEncoder.for_backbone(bb)
    done = 0
    for messages, concepts in CASES[:40]:
        if not reference.official_applies(messages, concepts):
            continue
        tok = copy.deepcopy(bb.tokenizer)
        tok.add_tokens([s for c in concepts for s in c.strings])
        text = official_string(messages, concepts, bb.num_image_tokens)
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        strings = [s for c in concepts for s in c.strings]
        ours = [i if i < bb.vocab_size else tok.convert_tokens_to_ids(strings[i - bb.vocab_size])
                for i in enc.encode(messages, concepts).ids]
        assert ours == ids
        done += 1
    assert done >= 15


def test_the_leading_space_rule_on_the_real_vocabulary(bb):
    """Text after an added token has no word start of its own (`<bo>,` is ',' not '▁,'); the
    start of the prompt and text that has a space do. Typed special text is characters."""
    enc = PromptEncoder.for_backbone(bb)
    V, tok = bb.vocab_size, bb.tokenizer
    e = enc.encode([Message("user", "<bo>, hi <bo>.\n<bo>x </s><image>", 1)], [ConceptTokens("bo", 2)])
    pieces = [tok.convert_ids_to_tokens(i) if i < V else f"<{i - V}>" for i in e.ids]
    photo = pieces.index("<image>")
    assert pieces[:3] == ["<s>", "▁A", "▁chat"]  # the start of the string: a word start
    assert pieces[photo - 4:photo] == ["▁US", "ER", ":", "▁"]
    # after the photo '\n' with no '▁' (as the HF processor tokenizes; the original LLaVA code's
    # chunked tokenization gives '▁', '\n' here: ADR 001), then the definition and the question
    assert pieces[photo + 576:] == [
        "<0x0A>", "<0>", "▁is", "▁", "<1>", "<2>", ".", "<0x0A>",
        "<0>", ",", "▁hi", "▁", "<0>", ".", "<0x0A>", "<0>", "x", "▁</", "s", "><", "image", ">",
        "▁A", "SS", "IST", "ANT", ":"]


def legacy_tokenizer():
    """The same vocabulary as older (legacy=True) conversions wrote it: a `▁` prepended by the
    normalizer to every piece of text, also after an added token, as SentencePiece's dummy prefix
    does in the slow tokenizer the official code uses."""
    spec = json.loads((REAL_TOKENIZER / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "▁"}]}
    spec["pre_tokenizer"] = None
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def test_a_legacy_tokenizer_is_followed_too(bb):
    """The ambiguity of ADR 001: a legacy tokenizer puts '▁' after added tokens. The encoder follows
    whichever rule the checkpoint's tokenizer has, so it equals the reference for both. (The
    reference adds the names as tokens that split the raw text, as the slow tokenizer does: a plain
    `add_tokens(str)` on this fast form matches the name only where the normalized text has '▁'
    before it, so `x<bo>` keeps `<bo>` as characters.)"""
    from tokenizers import AddedToken

    tok = legacy_tokenizer()
    plain = copy.deepcopy(tok)
    plain.add_tokens(["<bo>"])
    assert plain("Is <bo> here, x<bo>", add_special_tokens=False)["input_ids"].count(
        plain.convert_tokens_to_ids("<bo>")) == 1
    ref = Reference(tok, bb.vocab_size, bb.image_token_id, bb.num_image_tokens,
                    add=lambda s: AddedToken(s, normalized=False, special=False))
    enc = PromptEncoder(tok, bb.vocab_size, bb.image_token_id, bb.num_image_tokens)
    modern = PromptEncoder.for_backbone(bb)
    differ = 0
    for messages, concepts in CASES[:80]:
        ours = enc.encode(messages, concepts)
        assert ours.ids == ref.marked_ids(messages, concepts)
        if ref.official_applies(messages, concepts):
            assert ref.to_official(ours.ids, concepts) == ref.official_ids(messages, concepts)
        differ += ours.ids != modern.encode(messages, concepts).ids
    assert differ >= 40  # the two rules really differ on these prompts
    bo = ConceptTokens("bo", 1)
    for encoder, comma in ((enc, "▁,"), (modern, ",")):
        ids = encoder.encode([Message("user", "<bo>,")], [bo]).ids
        mention = len(ids) - 1 - ids[::-1].index(bb.vocab_size)  # the question's <bo>
        assert tok.convert_ids_to_tokens(ids[mention + 1]) == comma


def test_hf_processor_expands_image_as_we_do(bb, reference):
    """LlavaProcessor (the checkpoint's processor_config: patch 14, CLS dropped) with the real tokenizer
    and image processor gives the same ids and pixels as the project's encoding."""
    proc = AutoProcessor.from_pretrained(llava15_folder())
    proc.tokenizer = copy.deepcopy(proc.tokenizer)
    proc.tokenizer.add_tokens(sorted(reference.added - set(bb.tokenizer.get_added_vocab())))
    enc = PromptEncoder.for_backbone(bb)
    checked = 0
    for messages, concepts in CASES[:60]:
        n = sum(m.images for m in messages)
        if not n or not reference.official_applies(messages, concepts):
            continue
        photos = [random_photo(i, size=40 + 13 * i) for i in range(n)]
        text = official_string(messages, concepts, 1)  # one <image> per photo: the processor expands it
        out = proc(images=photos, text=text, return_tensors="pt")
        strings = [s for c in concepts for s in c.strings]
        ours = [i if i < bb.vocab_size else proc.tokenizer.convert_tokens_to_ids(strings[i - bb.vocab_size])
                for i in enc.encode(messages, concepts).ids]
        assert out["input_ids"][0].tolist() == ours
        assert torch.equal(out["pixel_values"], bb.preprocess(photos))
        checked += 1
    assert checked >= 15


# -- decoding ----------------------------------------------------------------------------------


def answer_ids(enc, question, answer, concepts):
    """The labelled ids of an answer (its `</s>` aside) as training encodes them."""
    e = enc.encode([Message("user", question), Message("assistant", answer)], concepts)
    return [i for i in e.labels if i != -100][:-1]


def test_decode_inverts_encode_and_equals_the_reference(bb, reference):
    """Every answer decodes back to its text, with the reference tokenizer's spacing at names."""
    enc = PromptEncoder.for_backbone(bb)
    rng = random.Random(5)
    checked = 0
    for seed in range(120):
        names = rng.sample(NAMES, 3)
        concepts = [ConceptTokens(n, 2) for n in names]
        answer = rng.choice(ANSWERS).format(**{x: f"<{rng.choice(names)}>" for x in "abc"})
        if seed % 3 == 0:
            answer = answer.replace("<", " <", 1) + rng.choice(["", " ", "\n", "!"])
        ids = answer_ids(enc, "Tell me.", answer, concepts)
        assert enc.decode(ids, concepts) == answer, (answer, ids)  # the ' ' before an answer is the decoder's to strip
        ref = reference.official.decode(reference.to_official(ids, concepts), skip_special_tokens=True)
        assert enc.decode(ids, concepts) == ref
        checked += 1
    assert checked == 120
    bo = [ConceptTokens("bo", 2)]
    assert enc.decode(answer_ids(enc, "Is it?", "Yes, <bo> is in this photo.", bo), bo) == \
        "Yes, <bo> is in this photo."


@pytest.mark.parametrize("model,answers", [
    ("tiny", ["Yes, <bo> is in this photo.", "<bo>, <mam> and <bo>!", "I see <bo><mam>.", "No.\n<bo>"]),
    ("mini", ["yes, <bo> is in this photo.", "<bo> is a red circle.", "no, <bo> <mam> .", "is <bo> here?"]),
])
def test_decode_spacing_on_the_other_tokenizers(model, answers):
    """The byte-level BPE and the word-level vocabulary: names read with the spacing their own
    decoders give words (word-level: joined by spaces, punctuation attached)."""
    from yollava.backbone import load_backbone

    backbone = load_backbone(model)
    enc = PromptEncoder.for_backbone(backbone)
    concepts = [ConceptTokens("bo", 2), ConceptTokens("mam", 2)]
    ref = copy.deepcopy(backbone.tokenizer)
    ref.add_tokens([s for c in concepts for s in c.strings])
    strings = [s for c in concepts for s in c.strings]
    for answer in answers:
        ids = answer_ids(enc, "hi", answer, concepts)
        ref_ids = [i if i < backbone.vocab_size else ref.convert_tokens_to_ids(strings[i - backbone.vocab_size])
                   for i in ids]
        assert enc.decode(ids, concepts) == ref.decode(ref_ids, skip_special_tokens=True)
    if model == "mini":
        assert enc.decode(answer_ids(enc, "hi", answers[0], concepts), concepts) == "yes, <bo> is in this photo."
        assert enc.decode(answer_ids(enc, "hi", "<bo> <mam>", concepts), concepts) == "<bo> <mam>"
    else:  # byte-level BPE keeps the space that separates the answer from `ASSISTANT:`
        for answer in answers:
            assert enc.decode(answer_ids(enc, "hi", answer, concepts), concepts) == " " + answer


# -- generation on the real vocabulary: a model that says what it is told -----------------------


def scripted(script: list[int], concepts_rows, extra_head: dict | None = None):
    """A real-vocabulary LLaVA whose greedy output after `ASSISTANT:` is `script` (then `</s>`).

    Every layer's output projections are zero, so the last hidden state is the normed embedding of
    the current token; each script token's embedding is a direction whose head row is its
    successor's. `extra_head`: token -> the script position whose direction it also answers to,
    more strongly (to test that the generator refuses it)."""
    backbone = build_llava15_backbone("tiny", REAL_TOKENIZER, seed=3)
    lm = backbone.model.model.language_model
    d, V = backbone.hidden_size, backbone.vocab_size
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head, emb = backbone.lm_head.weight, backbone.embed_tokens.weight
        head.mul_(0.01)
        q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0]
        prompt_last = PromptEncoder.for_backbone(backbone).encode([Message("user", "go")]).ids[-1]
        chain = [prompt_last] + script + [backbone.tokenizer.eos_token_id]
        assert len(set(chain)) == len(chain), "each token of a script has one successor"

        slots = [(c, r) for c in concepts_rows for r in range(c.tokens.num_tokens)]  # virtual id - V -> row

        def set_emb(tok, vec):
            if tok < V:
                emb[tok] = vec
            else:
                c, r = slots[tok - V]
                c.embed[r] = vec

        def set_head(tok, vec):
            if tok < V:
                head[tok] = vec
            else:
                c, r = slots[tok - V]
                c.head[r] = vec

        for j, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            set_emb(cur, q[j])
            set_head(nxt, 50 * q[j] / lm.norm.weight)
        for tok, j in (extra_head or {}).items():
            set_head(tok, 80 * q[j] / lm.norm.weight)
    return backbone


def run_scripted(backbone, concepts, max_new_tokens=64, stop=()):
    gen = Generator(backbone)
    req = GenerationRequest([Message("user", "go")], concepts, [], SamplingParams(max_new_tokens, stop=stop))
    deltas = []
    res = gen.generate([req], on_delta=lambda b, d: deltas.append(d))[0]
    return res, deltas


def test_streamed_identifiers_bytes_and_spacing_on_the_real_vocabulary():
    """The model says `Yes, <bo> is  😀 here!日本<mam>.` token by token (a lone '▁' before the name,
    an emoji as four byte tokens): the text is the reference tokenizer's decoding, the stream adds
    up to it, and no half-decoded character is ever sent."""
    tok = load_llava15_tokenizer(REAL_TOKENIZER)
    V = REAL_VOCAB_ROWS
    piece = tok.convert_tokens_to_ids
    emoji = [piece(f"<0x{b:02X}>") for b in "😀".encode()]
    script = ([piece("▁Yes"), piece(","), piece("▁"), V, piece("▁is"), piece("▁▁")] + emoji
              + [piece("▁here"), piece("!"), piece("日"), piece("本"), V + 3, piece(".")])
    assert tok.unk_token_id not in script
    concepts = [random_rows_of("bo", 2, SHAPES["tiny"].hidden, 1), random_rows_of("mam", 2, SHAPES["tiny"].hidden, 2)]
    backbone = scripted(script, concepts)
    res, deltas = run_scripted(backbone, concepts)
    assert res.token_ids == script and res.finish_reason == "stop"
    ref = copy.deepcopy(tok)
    strings = [s for c in concepts for s in c.tokens.strings]
    ref.add_tokens(strings)
    ref_ids = [i if i < V else ref.convert_tokens_to_ids(strings[i - V]) for i in script]
    assert res.text == ref.decode(ref_ids, skip_special_tokens=True) == "Yes, <bo> is  😀 here!日本<mam>."
    assert "".join(deltas) == res.text
    assert all("\ufffd" not in d for d in deltas)  # a half-decoded emoji is never sent
    assert len(deltas) >= 8  # streamed piece by piece, not at the end


def random_rows_of(name, k, d, seed):
    from yollava.concept_model import ConceptRows

    g = torch.Generator().manual_seed(seed)
    return ConceptRows(ConceptTokens(name, k), torch.randn(k + 1, d, generator=g) * 0.01,
                       torch.randn(k + 1, d, generator=g) * 0.01)


def test_stop_strings_inside_a_sentencepiece_piece():
    tok = load_llava15_tokenizer(REAL_TOKENIZER)
    script = tok("Hello wonderful world", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(script) == ["▁Hello", "▁wonderful", "▁world"]
    concepts = [random_rows_of("bo", 1, SHAPES["tiny"].hidden, 0)]
    backbone = scripted(script, concepts)
    full, _ = run_scripted(backbone, concepts)
    assert full.text == "Hello wonderful world"
    for stop, text in [("ell", "H"), ("lo won", "Hel"), ("derf", "Hello won"), ("ul w", "Hello wonderf"),
                       ("world", "Hello wonderful "), ("xyz", "Hello wonderful world")]:
        res, deltas = run_scripted(backbone, concepts, stop=(stop,))
        assert res.text == text, stop
        assert "".join(deltas) == text, stop  # nothing past the stop string was streamed
        assert res.finish_reason == "stop"


def test_padding_rows_past_the_tokenizer_are_never_generated():
    """Rows 32,002..32,063 are no token (the reference's resize drops them): even when one
    scores highest, the generator goes on with the best real token."""
    tok = load_llava15_tokenizer(REAL_TOKENIZER)
    script = tok("Hello wonderful world", add_special_tokens=False)["input_ids"]
    concepts = [random_rows_of("bo", 1, SHAPES["tiny"].hidden, 0)]
    backbone = scripted(script, concepts, extra_head={32010: 1, 32063: 2})
    with torch.no_grad():  # the padding rows really do score highest at those steps
        h = backbone.embed_tokens.weight[script[0]]
        logits = backbone.lm_head(backbone.model.model.language_model.norm(h))
        assert int(logits.argmax()) == 32010
    res, _ = run_scripted(backbone, concepts)
    assert res.token_ids == script and res.text == "Hello wonderful world"


def test_streamed_text_equals_the_answer_on_the_random_checkpoint(bb):
    gen = Generator(bb)
    bo, mam = random_rows(bb, "bo", seed=1, scale=3), random_rows(bb, "mam", seed=2, scale=3)
    reqs = [GenerationRequest([Message("user", "Is <bo> in the photo? 😀", 1)], [bo], [random_photo(1)],
                              SamplingParams(max_new_tokens=16)),
            GenerationRequest([Message("user", "Tell me about <mam> and <bo>.")], [mam, bo], [],
                              SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))]
    deltas: dict[int, str] = {}
    out = gen.generate(reqs, on_delta=lambda b, d: deltas.__setitem__(b, deltas.get(b, "") + d))
    for b, res in enumerate(out):
        assert deltas.get(b, "") == res.text
        assert all(t < len(bb.tokenizer) or t >= bb.vocab_size for t in res.token_ids)
        assert res.text == gen.encoder.decode(res.token_ids, [c.tokens for c in reqs[b].concepts])


# -- training and serving encode alike -----------------------------------------------------------


def test_training_and_serving_use_the_same_encoding(bb, tmp_path):
    """A training sample (the trainer's encoding) and the same question through the chat service's
    request path (HTTP body -> messages -> Generator) give the same prompt ids, with the same
    leading-space choice after the photo and the names; the answer's labels decode to its text."""
    import base64
    import io

    from serve.limits import Limits, to_chat
    from serve.schemas import ChatCompletionRequest
    from yollava.recipe import PhotoRef, RecipeConfig, recognition_sample
    from yollava.trainer import PackedTrainer

    photo = random_photo(4)
    cfg = RecipeConfig(num_latent=4)
    trainer = PackedTrainer(bb, cfg, lambda ref: photo, progress=False)
    sample = recognition_sample("bo", PhotoRef("p"), True, random.Random(3))
    trained = trainer._item(sample).enc
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": sample.messages[0].text}]}]}
    chat = to_chat(ChatCompletionRequest.model_validate(body), Limits())
    rows = random_rows(bb, "bo", k=4)
    served = Generator(bb).encode(GenerationRequest(chat.messages, [rows], chat.images))
    assert served.ids == trained.ids[:len(served.ids)]
    assert served.image_mask == trained.image_mask[:len(served.ids)]
    labelled = [i for i in trained.labels if i != -100][:-1]
    assert PromptEncoder.for_backbone(bb).decode(labelled, [rows.tokens]) == sample.messages[1].text
