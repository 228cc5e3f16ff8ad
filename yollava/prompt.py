"""The LLaVA-1.5 (vicuna_v1) conversation format with concept definitions.

    {system} USER: <image>\\n<bo> is <bo_1>…<bo_16>.\\n{question} ASSISTANT: {answer}</s>USER: …

The photo opens the first user turn and the concept definitions follow it, as
in the Yo'LLaVA code; so everything before the definitions (system prompt and
photo) is the same for every subject and can be computed once (`prefix_len`).

Token ids below `vocab_size` are the base tokenizer's; concept tokens get
*virtual ids* `vocab_size + slot`, where slots number the rows of the concepts
of one sequence in order. Image positions are recorded in `image_mask` here,
from the structure of the conversation, never by scanning ids: text a user
types (`<image>`, `</s>`, `<bo_3>`) is tokenized as plain characters.

Text between those tokens is tokenized the way the reference tokenizes it
(`tokenizer.add_tokens(concept tokens)`, then the whole prompt as one string):
the first run as the start of a string, every later run as text that follows
an added token. With SentencePiece (LLaVA-1.5's Llama tokenizer) the
difference is the leading `▁`: the start of a string gets one, text after an
added token does not (ADR 001). Encoding and decoding both go through a
private copy of the tokenizer with marker tokens added where the reference has
its added tokens, so the tokenizer's own rules decide, whatever they are.
"""

from __future__ import annotations

import copy
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Literal, Sequence, Union

from tokenizers import AddedToken

from yollava.tokens import NAME_PATTERN, ConceptTokens

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IGNORE_INDEX = -100
MENTION_RE = re.compile(rf"<({NAME_PATTERN}(?:/{NAME_PATTERN})?)>")
# Markers: added tokens of a private copy of the tokenizer, standing where a non-text token
# stands in the reference string (a concept: an added token that splits the raw text; a photo
# or `</s>`: with the attributes of the tokenizer's own added token). Lowercase, no spaces: no
# normalizer or decoder of a supported tokenizer changes them.
CONCEPT = "concept"  # the kind of a concept token (any virtual id)
MARK_PREFIX = "<|yollava-"


@dataclass
class Message:
    role: Literal["user", "assistant"]
    text: str
    images: int = 0  # photos at the start of this (user) turn

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"role={self.role!r} must be 'user' or 'assistant'")
        if self.images and self.role != "user":
            raise ValueError("only user turns carry photos")


@dataclass
class Encoded:
    """One tokenized sequence (no padding)."""

    ids: list[int]
    image_mask: list[bool]
    labels: list[int]
    num_images: int
    prefix_len: int  # tokens before the first concept definition
    concepts: list[ConceptTokens] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def mentions(text: str) -> list[str]:
    """Concept references `<name>` / `<owner/name>` in user text, in order, unique."""
    seen: dict[str, None] = {}
    for m in MENTION_RE.finditer(text):
        seen.setdefault(m.group(1), None)
    return list(seen)


class PromptEncoder:
    def __init__(self, tokenizer, vocab_size: int, image_token_id: int, num_image_tokens: int,
                 system: str = SYSTEM_PROMPT, add_bos: bool = True):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.system = system
        self.add_bos = add_bos and tokenizer.bos_token_id is not None
        self._kinds = tuple(k for k in (CONCEPT, image_token_id, tokenizer.eos_token_id) if k is not None)
        self._marked = marked_tokenizer(tokenizer, self._kinds)
        self._one: dict[int, str] = {}  # base id -> its text alone (at most one entry per vocabulary row)

    @classmethod
    def for_backbone(cls, backbone, **kw) -> "PromptEncoder":
        return cls(backbone.tokenizer, backbone.vocab_size, backbone.image_token_id,
                   backbone.num_image_tokens, **kw)

    def slot_offsets(self, concepts: Sequence[ConceptTokens]) -> list[int]:
        offsets, n = [], 0
        for c in concepts:
            offsets.append(n)
            n += c.num_tokens
        return offsets

    def text_ids(self, text: str, after: Kind | None = None, before: Kind | None = None) -> list[int]:
        """Token ids of plain text (typed special tokens stay characters).

        `after` / `before`: the kind of non-text token next to the text in the
        prompt (`CONCEPT`, or the id of a photo or `</s>` token), so the text is
        tokenized as the reference tokenizes text next to that added token;
        None on both sides: as a string of its own.
        """
        return self._run(text, after, before)[0]

    def _run(self, text: str, after: Kind | None, before: Kind | None,
             offsets: bool = False) -> tuple[list[int], list[tuple[int, int]] | None]:
        """(ids, each token's character span in `text` if `offsets`) of one run of text."""
        if not text:
            return [], [] if offsets else None
        kw = dict(add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=offsets)
        if after is None and before is None:
            out = self.tokenizer(text, **kw)
            return out["input_ids"], out.get("offset_mapping")
        m = self._marked
        if any(mark in text for mark, _ in m.marks.values()):  # the text holds a marker: a one-off copy
            m = _Marked.build(self.tokenizer, self._kinds, avoid=text)
        head, tail = m.mark(after), m.mark(before)
        shift = len(head[0]) if head else 0
        out = m.tokenizer((head[0] if head else "") + text + (tail[0] if tail else ""), **kw)
        ids = out["input_ids"]
        cut = slice(1 if head else 0, len(ids) - 1 if tail else len(ids))
        body = ids[cut]
        if (head and ids[:1] != [head[1]]) or (tail and ids[-1:] != [tail[1]]) or set(body) & m.ids:
            raise RuntimeError(f"tokenizer {type(self.tokenizer).__name__} did not keep the markers "
                               f"around {text[:40]!r} as single tokens")
        spans = [(a - shift, b - shift) for a, b in out["offset_mapping"][cut]] if offsets else None
        return body, spans

    def encode(self, messages: Sequence[Message], concepts: Sequence[ConceptTokens] = ()) -> Encoded:
        """Tokenize a conversation; `concepts` are this sequence's concepts, in slot order.

        Ending on a user message leaves the ids at ` ASSISTANT:`, ready to generate.
        """
        if not messages or messages[0].role != "user":
            raise ValueError("a conversation starts with a user message")
        names = [c.identifier for c in concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate concepts in one sequence: {names}")
        b = _Builder(self)
        if self.add_bos:
            b.special(self.tokenizer.bos_token_id, in_string=False)
        b.text(f"{self.system} " if self.system else "")
        offsets = self.slot_offsets(concepts)
        by_ref = {c.identifier[1:-1]: (c, off) for c, off in zip(concepts, offsets)}
        prefix_len = None
        for i, msg in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if msg.role != expected:
                raise ValueError(f"messages[{i}].role={msg.role!r}: roles must alternate user/assistant")
            if msg.role == "user":
                b.text("USER: ")
                for _ in range(msg.images):
                    b.image()
                    b.text("\n")
                if i == 0:
                    if concepts:  # (without, the text runs on: cutting it would change its tokens)
                        b.flush(before=CONCEPT)
                    prefix_len = len(b.ids)
                    for c, off in zip(concepts, offsets):
                        b.definition(c, off)
                b.mentions(msg.text, by_ref)
                b.text(" ASSISTANT:")
            else:
                b.text(" ", label=True)
                b.mentions(msg.text, by_ref, label=True)
                b.special(self.tokenizer.eos_token_id, label=True)
        b.flush()
        return Encoded(b.ids, b.image_mask, b.labels, b.num_images, prefix_len or 0, list(concepts))

    def decode(self, ids: Sequence[int], concepts: Sequence[ConceptTokens]) -> str:
        """Base ids through the tokenizer; identifier virtual ids back to `<name>`.

        Spacing is what the reference tokenizer (concept tokens added) decodes:
        each run of base ids is decoded between markers standing for the names
        next to it, and the markers are cut off by position.
        """
        ids = [int(i) for i in ids]
        if len(ids) == 1 and ids[0] < self.vocab_size:  # a streamed answer's every step: cached
            if ids[0] not in self._one:
                self._one[ids[0]] = self._decode_run(ids, after_name=False, before_name=False)
            return self._one[ids[0]]
        if not ids or max(ids) < self.vocab_size:  # no concept token: one run
            return self._decode_run(ids, after_name=False, before_name=False)
        slot_to_text: dict[int, str | None] = {}
        for c, off in zip(concepts, self.slot_offsets(concepts)):
            slot_to_text[off] = c.identifier
            for t in range(1, c.num_tokens):
                slot_to_text[off + t] = None  # latents are never shown (nor generated)
        pieces: list[list[int] | str] = []  # runs of base ids, and names
        for i in ids:
            if i < self.vocab_size:
                if not pieces or isinstance(pieces[-1], str):
                    pieces.append([])
                pieces[-1].append(i)
                continue
            name = slot_to_text.get(i - self.vocab_size)
            if name is None:
                continue
            if pieces and isinstance(pieces[-1], str):
                pieces.append([])  # two names in a row: the decoder decides what goes between them
            pieces.append(name)
        out = []
        for n, piece in enumerate(pieces):
            if isinstance(piece, str):
                out.append(piece)
            else:
                out.append(self._decode_run(piece, after_name=n > 0, before_name=n + 1 < len(pieces)))
        return "".join(out)

    def _decode_run(self, run: list[int], after_name: bool, before_name: bool) -> str:
        """Decode base ids as they read between names: `marker + run + marker`, markers cut off."""
        if not (after_name or before_name):
            return self.tokenizer.decode(run, skip_special_tokens=True)
        m = self._marked
        mark, mark_id = m.marks[CONCEPT]
        ids = ([mark_id] if after_name else []) + run + ([mark_id] if before_name else [])
        text = m.tokenizer.decode(ids, skip_special_tokens=True)
        if (after_name and not text.startswith(mark)) or (before_name and not text.endswith(mark)):
            raise RuntimeError(f"tokenizer {type(self.tokenizer).__name__} decodes the marker {mark!r} "
                               f"as something else: {text[:80]!r}")
        return text[len(mark) if after_name else 0:len(text) - len(mark) if before_name else len(text)]


Kind = Union[str, int]  # CONCEPT, or the id of a non-text base token (photo, `</s>`)


@dataclass(frozen=True)
class _Marked:
    """A private copy of a tokenizer with one marker (a non-special added token) per kind."""

    tokenizer: object
    marks: dict  # kind -> (marker string, its id)

    @property
    def ids(self) -> set[int]:
        return {i for _, i in self.marks.values()}

    def mark(self, kind: Kind | None) -> tuple[str, int] | None:
        if kind is None:
            return None
        if kind not in self.marks:
            raise ValueError(f"no marker for kind={kind!r}; known: {sorted(map(str, self.marks))}")
        return self.marks[kind]

    @classmethod
    def build(cls, tokenizer, kinds: Sequence[Kind], avoid: str = "") -> "_Marked":
        """`avoid`: a text that holds a marker string gets a copy whose markers it does not hold."""
        tok = copy.deepcopy(tokenizer)
        own = getattr(tokenizer, "added_tokens_decoder", {})
        marks: dict = {}
        for kind in dict.fromkeys(kinds):
            label, n = (CONCEPT if kind == CONCEPT else f"token-{kind}"), 0
            mark = f"{MARK_PREFIX}{label}|>"
            while mark in avoid:
                n += 1
                mark = f"{MARK_PREFIX}{label}-{n}|>"
            like = None if kind == CONCEPT else own.get(kind)
            if like is None:
                # a concept: splits the raw text, as added tokens do in the official code's (slow)
                # tokenizer; on the fast tokenizers of LLaVA-1.5, mini and tiny (no normalizer, or
                # lowercase) the same as `add_tokens(str)`, on a legacy one (a normalizer that
                # prepends '▁') the only way the name splits mid-text at all (ADR 001)
                token = AddedToken(mark, normalized=False, special=False)
            else:  # a photo or `</s>`: splits the text as that added token does
                token = AddedToken(mark, single_word=like.single_word, lstrip=like.lstrip, rstrip=like.rstrip,
                                   normalized=like.normalized, special=False)
            added = tok.add_tokens([token])
            if added != 1:
                raise RuntimeError(f"could not add the marker {mark!r} to tokenizer {type(tokenizer).__name__}")
            marks[kind] = (mark, tok.convert_tokens_to_ids(mark))
        return cls(tok, marks)


_MARKED: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_MARKED_LOCK = threading.Lock()


def marked_tokenizer(tokenizer, kinds: Sequence[Kind]) -> _Marked:
    """The marked copy of `tokenizer` for `kinds`, made once per tokenizer object (copying a
    32k vocabulary takes ~0.2 s)."""
    key = tuple(dict.fromkeys(kinds))
    with _MARKED_LOCK:
        per_tokenizer = _MARKED.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = _Marked.build(tokenizer, key)
        return per_tokenizer[key]


class _Builder:
    """Accumulates text and flushes it at every non-text token, like added-token splitting."""

    def __init__(self, enc: PromptEncoder):
        self.enc = enc
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.image_mask: list[bool] = []
        self.num_images = 0
        self._parts: list[tuple[str, bool]] = []  # buffered text, (text, labelled) in order
        # what the buffered text follows in the reference string: nothing (its start; the BOS is
        # added outside the string) or a non-text token's kind
        self._after: Kind | None = None

    def _push(self, ids: list[int], label: bool, image: bool = False) -> None:
        self.ids += ids
        self.labels += ids if label else [IGNORE_INDEX] * len(ids)
        self.image_mask += [image] * len(ids)

    def flush(self, before: Kind | None = None) -> None:
        """Tokenize the buffered text as one run, as the reference tokenizes the text between two
        added tokens; `before`: the kind of the token that follows it. Where labelled text
        (an answer) follows unlabelled text in the run, a token is labelled if it starts in it."""
        parts, self._parts = self._parts, []
        text = "".join(t for t, _ in parts)
        if not text:
            return
        labels = {lab for t, lab in parts if t}
        if len(labels) == 1:
            self._push(self.enc.text_ids(text, self._after, before), labels.pop())
            return
        ids, spans = self.enc._run(text, self._after, before, offsets=True)
        char_label = [lab for t, lab in parts for _ in t]
        for i, (start, _) in zip(ids, spans):
            self._push([i], char_label[min(max(start, 0), len(text) - 1)])

    def text(self, s: str, label: bool = False) -> None:
        if self._parts and self._parts[-1][1] == label:
            self._parts[-1] = (self._parts[-1][0] + s, label)
        else:
            self._parts.append((s, label))

    def _kind(self, token_id: int) -> Kind:
        return CONCEPT if token_id >= self.enc.vocab_size or token_id not in self.enc._marked.marks else token_id

    def special(self, token_id: int, label: bool = False, in_string: bool = True) -> None:
        """A non-text token; `in_string=False` for the BOS, which the reference adds outside the string."""
        if not in_string:
            self.flush()
            self._push([token_id], label)
            return
        kind = self._kind(token_id)
        self.flush(before=kind)
        self._push([token_id], label)
        self._after = kind

    def image(self) -> None:
        kind = self._kind(self.enc.image_token_id)
        self.flush(before=kind)
        self._push([self.enc.image_token_id] * self.enc.num_image_tokens, False, image=True)
        self.num_images += 1
        self._after = kind

    def definition(self, c: ConceptTokens, offset: int) -> None:
        V = self.enc.vocab_size
        self.special(V + offset)
        self.text(" is ")
        for t in range(1, c.num_tokens):
            self.special(V + offset + t)
        self.text(".\n")

    def mentions(self, text: str, by_ref: dict, label: bool = False) -> None:
        pos = 0
        for m in MENTION_RE.finditer(text):
            hit = by_ref.get(m.group(1))
            if hit is None:
                continue  # not a concept of this sequence: stays plain text
            self.text(text[pos:m.start()], label)
            self.special(self.enc.vocab_size + hit[1], label)
            pos = m.end()
        self.text(text[pos:], label)
