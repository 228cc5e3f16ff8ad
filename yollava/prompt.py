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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

from yollava.tokens import NAME_PATTERN, ConceptTokens

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IGNORE_INDEX = -100
MENTION_RE = re.compile(rf"<({NAME_PATTERN}(?:/{NAME_PATTERN})?)>")


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
        # A plain word decoded next to a run of text, then cut off again, lets the
        # tokenizer's own decoder decide the spacing where a run meets a concept name.
        anchor = self.text_ids("a")
        self._anchor = anchor if len(anchor) == 1 else []
        self._anchor_text = tokenizer.decode(self._anchor) if self._anchor else ""

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

    def text_ids(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

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
            b.special(self.tokenizer.bos_token_id)
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
                    b.flush()
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
        """Base ids through the tokenizer; identifier virtual ids back to `<name>`."""
        slot_to_text: dict[int, str] = {}
        for c, off in zip(concepts, self.slot_offsets(concepts)):
            slot_to_text[off] = c.identifier
            for t, s in enumerate(c.latents, start=1):
                slot_to_text[off + t] = ""  # latents are never shown (nor generated)
        pieces: list[list[int] | str] = []  # runs of base ids, and names
        for i in ids:
            if i < self.vocab_size:
                if not pieces or isinstance(pieces[-1], str):
                    pieces.append([])
                pieces[-1].append(int(i))
            else:
                pieces.append(slot_to_text.get(int(i) - self.vocab_size, ""))
        out = []
        for n, piece in enumerate(pieces):
            if isinstance(piece, str):
                out.append(piece)
            else:
                out.append(self._decode_run(piece, after_name=n > 0, before_name=n + 1 < len(pieces)))
        return "".join(out)

    def _decode_run(self, run: list[int], after_name: bool, before_name: bool) -> str:
        """Decode base ids as they read between names: `anchor + run + anchor`, anchors cut off."""
        a, t = self._anchor, self._anchor_text
        if not a:
            return self.tokenizer.decode(run, skip_special_tokens=True)
        ids = (a if after_name else []) + run + (a if before_name else [])
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if after_name and text.startswith(t):
            text = text[len(t):]
        if before_name and text.endswith(t):
            text = text[:-len(t)]
        return text


class _Builder:
    """Accumulates text and flushes it at every non-text token, like added-token splitting."""

    def __init__(self, enc: PromptEncoder):
        self.enc = enc
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.image_mask: list[bool] = []
        self.num_images = 0
        self._buf = ""
        self._buf_label = False

    def _push(self, ids: list[int], label: bool, image: bool = False) -> None:
        self.ids += ids
        self.labels += ids if label else [IGNORE_INDEX] * len(ids)
        self.image_mask += [image] * len(ids)

    def flush(self) -> None:
        if self._buf:
            self._push(self.enc.text_ids(self._buf), self._buf_label)
        self._buf = ""

    def text(self, s: str, label: bool = False) -> None:
        if self._buf and label != self._buf_label:
            self.flush()
        self._buf += s
        self._buf_label = label

    def special(self, token_id: int, label: bool = False) -> None:
        self.flush()
        self._push([token_id], label)

    def image(self) -> None:
        self.flush()
        self._push([self.enc.image_token_id] * self.enc.num_image_tokens, False, image=True)
        self.num_images += 1

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
