"""Pretraining and probe tasks on the miniature world: one question about one scene each.

Naming tasks go through the concept-token mechanism itself: a placeholder
name `<nJ>` is defined by latent rows that are either the word embeddings of
a description ("a red striped circle") or the image tokens of the object from
example photos. So the base learns to read `<name> is <latents>.` — the exact
form Yo'LLaVA's learned tokens take later.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from yollava import templates
from yollava.templates import QA_SUFFIX
from miniworld import world
from miniworld.world import Obj, Scene
from yollava.prompt import Message

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_NAMES = 32
QUESTIONS = [*templates.RECOGNITION_QUESTIONS, templates.RECOGNITION_EVAL_QUESTION]  # training + evaluation forms


@dataclass
class Definition:
    name: int  # placeholder name index: `<n{name}>`
    words: str | None = None  # definition by description
    examples: list[tuple[Scene, int]] = field(default_factory=list)  # (scene, cell) definitions by example
    obj: Obj | None = None  # the object defined (for latent forms built from it)
    form: str = ""  # "" (words or examples as above), "hidden" (words + the notch's hidden row), "sum" (one row:
    #                 attribute words summed + hidden row, like an image token)
    fillers: int = 0  # extra latent rows near the mean word (what personalization starts from), carrying nothing
    noise: float = 0.0  # relative gaussian noise on the informative rows
    draw: int = 0  # seed of the noise and the fillers (so a task is the same wherever it is built)


@dataclass
class Task:
    kind: str
    scene: Scene | None
    messages: list[Message]
    definition: Definition | None = None
    candidates: list[str] = field(default_factory=list)  # for probes: answers to compare
    correct: int = 0


def in_words(o: Obj, attrs=("colour", "pattern", "shape")) -> str:
    parts = []
    if "colour" in attrs:
        parts.append(o.colour)
    if "pattern" in attrs:
        parts.append(o.pattern)  # "plain" said out loud: "a circle" would mean any circle
    parts.append(o.shape if "shape" in attrs else "object")
    return "a " + " ".join(parts)


def _matches(o: Obj, ref: Obj, attrs) -> bool:
    return all(getattr(o, a) == getattr(ref, a) for a in attrs)


def existence(rng: random.Random) -> Task:
    scene = world.random_scene(rng)
    attrs = rng.choice([("shape",), ("colour",), ("colour", "shape"), ("colour", "pattern", "shape"),
                        ("pattern", "shape")])
    objs = scene.objects()
    absent = [x for x in world.ALL_OBJECTS if not any(_matches(o, x, attrs) for o in objs)]
    want_yes = rng.random() < 0.5 or not absent  # e.g. all four shapes present: no "no" exists
    ref = rng.choice(objs) if want_yes else rng.choice(absent)
    q = f"is there {in_words(ref, attrs)} in this photo?"
    return Task("existence", scene, [Message("user", q, 1), Message("assistant", "yes." if want_yes else "no.")],
                candidates=["yes.", "no."], correct=0 if want_yes else 1)


def attribute(rng: random.Random) -> Task:
    scene = world.random_scene(rng)
    objs = scene.objects()
    o = rng.choice(objs)
    kind = rng.choice(["colour", "shape", "pattern"])
    if kind == "colour":
        q, a, cands = f"what colour is the {o.shape}?", o.colour, world.COLOURS
        if sum(x.shape == o.shape for x in objs) > 1:
            q = f"what colour is the {o.pattern} {o.shape}?" if sum(
                x.shape == o.shape and x.pattern == o.pattern for x in objs) == 1 else None
    elif kind == "shape":
        q, a, cands = f"what shape is the {o.colour} object?", o.shape, world.SHAPES
        if sum(x.colour == o.colour for x in objs) > 1:
            q = None
    else:
        q, a, cands = f"what pattern does the {o.colour} {o.shape} have?", o.pattern, world.PATTERNS
        if sum(x.colour == o.colour and x.shape == o.shape for x in objs) > 1:
            q = None
    if q is None:
        return existence(rng)
    return Task("attribute", scene, [Message("user", q, 1), Message("assistant", f"{a}.")],
                candidates=[f"{c}." for c in cands], correct=list(cands).index(a))


# binding, one hop: asked for one attribute of every object, the answer names each object by another
# attribute (random order, so the cell order cannot stand in), then the asked one: at the key word
# ("circle" in "circle red, square blue.") the next word is read from the image token that has that key
BINDING_KEY = {"colour": "shape", "shape": "colour", "pattern": "shape"}


def binding(rng: random.Random) -> Task:
    asked = rng.choice(list(BINDING_KEY))
    key = BINDING_KEY[asked]
    while True:
        objs = world.random_scene(rng, n_objects=(2, 4)).objects()
        if len({getattr(o, key) for o in objs}) == len(objs):
            break
    scene = world.random_scene(rng, must=objs, n_objects=(len(objs), len(objs)))
    order = rng.sample(objs, len(objs))
    a = ", ".join(f"{getattr(o, key)} {getattr(o, asked)}" for o in order) + "."
    return Task("binding", scene, [Message("user", f"describe the {asked} of the objects.", 1),
                                   Message("assistant", a)])


def counting(rng: random.Random) -> Task:
    scene = world.random_scene(rng, n_objects=(1, 6))
    n = len(scene.objects())
    return Task("counting", scene, [Message("user", "how many objects are in this photo?", 1),
                                    Message("assistant", f"{NUMBERS[n]}.")],
                candidates=[f"{w}." for w in NUMBERS[1:7]], correct=n - 1)


def caption(rng: random.Random) -> Task:
    scene = world.random_scene(rng)
    parts = [f"{in_words(o)} in the {world.POSITIONS[i]}" for i, o in enumerate(scene.cells) if o is not None]
    return Task("caption", scene, [Message("user", "describe this photo.", 1),
                                   Message("assistant", ", ".join(parts) + ".")])


def main_subject(rng: random.Random) -> Task:
    """The recipe's attribute questions, seen on a one-object photo."""
    o = rng.choice(world.ALL_OBJECTS)
    scene = world.random_scene(rng, must=[o], n_objects=(1, 1))
    i = rng.randrange(len(templates.ATTRIBUTE_QUESTIONS))
    q = templates.ATTRIBUTE_QUESTIONS[i][0]
    return Task("main_subject", scene, [Message("user", q, 1), Message("assistant", _attribute_answer(i, o))])


def _attribute_answer(i: int, o: Obj) -> str:
    return [f"it is {o.colour}.", f"it is a {o.shape}.", f"it is {o.pattern}.",
            "it has a dark mark in one corner.", "it is small.", f"it is a {o.shape}.",
            f"it is {in_words(o)}.", f"its {o.colour} colour.", "it looks made of paint.",
            f"it is {in_words(o)}."][i]


def _definition(rng: random.Random, o: Obj, by_example: bool) -> Definition:
    name = rng.randrange(NUM_NAMES)
    if not by_example:
        return Definition(name, words=in_words(o))
    m = rng.choice([1, 2, 4, 8, 16])
    examples = []
    for _ in range(m):
        s = world.random_scene(rng, must=[o])
        examples.append((s, s.cells.index(o)))
    return Definition(name, examples=examples)


def _soft_definition(rng: random.Random, o: Obj, forms=("hidden", "sum", "example")) -> Definition:
    """A definition the words cannot give: the notch's hidden row, summed rows or examples, with fillers."""
    form = rng.choice(forms)
    name = rng.randrange(NUM_NAMES)
    fillers = rng.choice([0, 0, 1, 3, 6, 12])
    noise = rng.choice([0.0, 0.0, 0.1, 0.3])
    if form == "example":
        d = _definition(rng, o, by_example=True)
        d.fillers, d.noise, d.obj, d.draw = fillers, noise, o, rng.randrange(2**31)
        return d
    return Definition(name, words=in_words(o) if form == "hidden" else None, obj=o, form=form, fillers=fillers,
                      noise=noise, draw=rng.randrange(2**31))


def notch_check(rng: random.Random) -> Task:
    """`<n> is a object <hidden row of one corner>.` and a one-object photo: yes iff its notch is that corner.
    The notch's single comparison, as `single_check` is for words."""
    o = rng.choice(world.ALL_OBJECTS)
    scene = world.random_scene(rng, must=[o], n_objects=(1, 1))
    yes = rng.random() < 0.5
    corner = o.notch if yes else rng.choice([n for n in world.NOTCHES if n != o.notch])
    d = Definition(rng.randrange(NUM_NAMES), words="a object", obj=Obj(o.shape, o.colour, o.pattern, corner),
                   form="hidden")
    c = f"<n{d.name}>"
    q = rng.choice(QUESTIONS).format(c=c)
    a = rng.choice(templates.YES_ANSWERS if yes else templates.NO_ANSWERS).format(c=c)
    return Task("notch_check", scene, [Message("user", q, 1), Message("assistant", a.lower())], d,
                candidates=["yes", "no"], correct=0 if yes else 1)


def naming_soft(rng: random.Random, one_object: bool = False, twin_share: float = 0.5,
                forms=("hidden", "sum", "example"), kind: str = "naming_soft") -> Task:
    """`<n> is <soft latents>.` (words + hidden notch row, a summed row, or examples; fillers; noise),
    then recognition; half yes; of the "no", `twin_share` the same object but for the notch."""
    o = rng.choice(world.ALL_OBJECTS)
    d = _soft_definition(rng, o, forms)
    c = f"<n{d.name}>"
    n_obj = (1, 1) if one_object else (1, 4)
    variants = o.variants()
    if rng.random() < 0.5:
        scene, yes = world.random_scene(rng, must=[o], avoid=set(variants["notch"]), n_objects=n_obj), True
    else:
        r = rng.random()
        if r < twin_share:
            other = rng.choice(variants["notch"])
        elif r < twin_share + (1 - twin_share) / 2:
            other = rng.choice(variants[rng.choice(["shape", "colour", "pattern"])])
        else:
            other = rng.choice([x for x in world.ALL_OBJECTS if x != o])
        scene, yes = world.random_scene(rng, must=[other], avoid={o}, n_objects=n_obj), False
    q = rng.choice(QUESTIONS).format(c=c)
    a = rng.choice(templates.YES_ANSWERS if yes else templates.NO_ANSWERS).format(c=c)
    return Task(kind, scene, [Message("user", q, 1), Message("assistant", a.lower())], d,
                candidates=["yes", "no"], correct=0 if yes else 1)


def naming(rng: random.Random, by_example: bool, hard_share: float = 0.5, negative: str | None = None) -> Task:
    """`<nJ> is <definition>.` then a recognition question; half yes, half no (hard or easy).

    `negative` forces the kind of every "no" scene: an attribute name (that
    attribute differs, e.g. "notch") or "easy" (any other object).
    """
    o = rng.choice(world.ALL_OBJECTS)
    d = _definition(rng, o, by_example)
    c = f"<n{d.name}>"
    variants = o.variants()
    described = {k: v for k, v in variants.items() if k != "notch"}
    if rng.random() < 0.5:
        scene, yes = world.random_scene(rng, must=[o], avoid=set(variants["notch"])), True
    else:
        kinds = variants if by_example else described  # words cannot tell the notch
        if negative is not None and negative != "easy":
            other = rng.choice(kinds[negative])
        elif negative is None and rng.random() < hard_share:
            kind = "notch" if by_example and rng.random() < 0.5 else rng.choice(list(kinds))
            other = rng.choice(kinds[kind])
        else:
            other = rng.choice([x for x in world.ALL_OBJECTS if x != o])
        avoid = {o} if by_example else {x for x in world.ALL_OBJECTS if _matches(x, o, ("shape", "colour", "pattern"))}
        scene, yes = world.random_scene(rng, must=[other], avoid=avoid), False
    q = rng.choice(QUESTIONS).format(c=c)
    a = rng.choice(templates.YES_ANSWERS if yes else templates.NO_ANSWERS).format(c=c)
    kind = "naming_example" if by_example else "naming_words"
    return Task(kind, scene, [Message("user", q, 1), Message("assistant", a.lower())], d,
                candidates=["yes", "no"], correct=0 if yes else 1)


def blind_attribute(rng: random.Random) -> Task:
    """Text only: a named object's attribute, read from its definition alone."""
    o = rng.choice(world.ALL_OBJECTS)
    d = _definition(rng, o, by_example=rng.random() < 0.7)
    c = f"<n{d.name}>"
    i = rng.choice([0, 1, 2, 5, 6])
    q = templates.ATTRIBUTE_QUESTIONS[i][1].format(c=c)
    return Task("blind_attribute", None, [Message("user", q, 0), Message("assistant", _attribute_answer(i, o))], d)


ATTRS = ("colour", "shape", "pattern")
VALUES = {"colour": world.COLOURS, "shape": world.SHAPES, "pattern": world.PATTERNS}
ASK = {"colour": "what colour is {c}?", "shape": "what shape is {c}?", "pattern": "what pattern does {c} have?"}


def naming_text(rng: random.Random) -> Task:
    """A name bound by a description in an earlier turn (no concept rows), then recognition.

    The form of the evaluation's description baseline: the name is plain text
    (its word is unknown to the vocabulary), the description is words.
    """
    o = rng.choice(world.ALL_OBJECTS)
    c = "<sks>"
    described = {k: v for k, v in o.variants().items() if k != "notch"}
    yes = rng.random() < 0.5
    if yes:
        scene = world.random_scene(rng, must=[o])
    else:
        other = rng.choice(described[rng.choice(list(described))]) if rng.random() < 0.5 else \
            rng.choice([x for x in world.ALL_OBJECTS if x != o])
        avoid = {x for x in world.ALL_OBJECTS if _matches(x, o, ("shape", "colour", "pattern"))}
        scene = world.random_scene(rng, must=[other], avoid=avoid)
    q = rng.choice(QUESTIONS).format(c=c)
    a = rng.choice(templates.YES_ANSWERS if yes else templates.NO_ANSWERS).format(c=c)
    lead = [Message("user", f"{c} is {in_words(o)}."), Message("assistant", f"understood, that is {c}.")]
    return Task("naming_text", scene, [*lead, Message("user", q, 1), Message("assistant", a.lower())],
                candidates=["yes", "no"], correct=0 if yes else 1)


def blind_choice(rng: random.Random) -> Task:
    """Text only, two options: an attribute of a named object (the evaluation's QA form)."""
    o = rng.choice(world.ALL_OBJECTS)
    d = _definition(rng, o, by_example=rng.random() < 0.7)
    c = f"<n{d.name}>"
    attr = rng.choice(ATTRS)
    truth = getattr(o, attr)
    opts = [truth, rng.choice([v for v in VALUES[attr] if v != truth])]
    rng.shuffle(opts)
    q = f"{ASK[attr].format(c=c)}\na. {opts[0]}\nb. {opts[1]}{QA_SUFFIX}"
    correct = opts.index(truth)
    return Task("blind_choice", None, [Message("user", q, 0), Message("assistant", "ab"[correct])], d,
                candidates=["a", "b"], correct=correct)


def single_attribute(rng: random.Random) -> Task:
    """Read one attribute of the only object: cannot be answered without the photo."""
    o = rng.choice(world.ALL_OBJECTS)
    scene = world.random_scene(rng, must=[o], n_objects=(1, 1))
    kind = rng.choice(ATTRS)
    values = VALUES[kind]
    q = ASK[kind].format(c="the object")
    a = getattr(o, kind)
    return Task("single_attribute", scene, [Message("user", q, 1), Message("assistant", f"{a}.")],
                candidates=[f"{v}." for v in values], correct=list(values).index(a))


def single_check(rng: random.Random) -> Task:
    """Compare one attribute of the only object with a word: yes or no, balanced."""
    o = rng.choice(world.ALL_OBJECTS)
    scene = world.random_scene(rng, must=[o], n_objects=(1, 1))
    kind = rng.choice(ATTRS)
    values = VALUES[kind]
    yes = rng.random() < 0.5
    v = getattr(o, kind) if yes else rng.choice([x for x in values if x != getattr(o, kind)])
    q = {"colour": f"is the object {v}?", "shape": f"is the object a {v}?", "pattern": f"is the object {v}?"}[kind]
    return Task("single_check", scene, [Message("user", q, 1), Message("assistant", "yes." if yes else "no.")],
                candidates=["yes.", "no."], correct=0 if yes else 1)


def position(rng: random.Random) -> Task:
    """What is in one cell: the object in words, or nothing."""
    scene = world.random_scene(rng)
    occupied = [i for i, o in enumerate(scene.cells) if o is not None]
    i = rng.choice(occupied) if rng.random() < 0.8 else rng.randrange(len(scene.cells))
    o = scene.cells[i]
    a = "nothing." if o is None else in_words(o) + "."
    return Task("position", scene, [Message("user", f"what is in the {world.POSITIONS[i]}?", 1),
                                    Message("assistant", a)])


# the curriculum: readouts first (they teach the language model to look at image
# tokens), comparisons next, names last; the mix moves linearly from START to MIX
# over the first `ramp` share of the steps
START = {"single_attribute": 4, "single_check": 3, "position": 2, "attribute": 1, "caption": 1,
         "existence": 1, "naming_words": 0.5, "naming_example": 0.5}
MIX = {"single_attribute": 0.5, "single_check": 0.5, "position": 1, "existence": 3, "attribute": 2,
       "counting": 1, "caption": 1, "main_subject": 1, "naming_words": 2, "naming_example": 5,
       "naming_text": 1.5, "blind_attribute": 1.5, "blind_choice": 1}
MAKERS = {"existence": existence, "attribute": attribute, "counting": counting, "caption": caption,
          "main_subject": main_subject, "naming_words": lambda r: naming(r, False),
          "naming_example": lambda r: naming(r, True), "blind_attribute": blind_attribute,
          "naming_text": naming_text, "blind_choice": blind_choice,
          "single_attribute": single_attribute, "binding": binding, "single_check": single_check, "position": position,
          "naming_notch": lambda r: naming(r, True, negative="notch"),
          "naming_easy": lambda r: naming(r, True, negative="easy"),
          "naming_soft": naming_soft,
          "notch_check": notch_check,
          "twin_one_words": lambda r: naming_soft(r, True, 1.0, ("hidden",), "twin_one_words"),
          "notch_one": lambda r: naming_soft(r, one_object=True, twin_share=0.8, kind="notch_one"),
          # probes: every "no" a twin
          "twin_one_hidden": lambda r: naming_soft(r, True, 1.0, ("hidden",), "twin_one_hidden"),
          "twin_one_example": lambda r: naming_soft(r, True, 1.0, ("example",), "twin_one_example"),
          "twin_hidden": lambda r: naming_soft(r, False, 1.0, ("hidden",), "twin_hidden"),
          "twin_sum": lambda r: naming_soft(r, False, 1.0, ("sum",), "twin_sum"),
          "soft_easy": lambda r: naming_soft(r, False, 0.0, ("hidden", "sum"), "soft_easy")}


# the notch curriculum (warm start): one-object notch naming first, then everything with soft names
MIX_SOFT = {**MIX, "naming_soft": 4, "notch_one": 1.5, "notch_check": 0.5}
STAGES_NOTCH = [
    ({**{k: v * 0.25 for k, v in MIX.items()}, "notch_check": 8, "notch_one": 3}, "notch_check", 0.9),
    ({**{k: v * 0.35 for k, v in MIX.items()}, "notch_check": 2, "notch_one": 6, "naming_soft": 2},
     "twin_one_hidden", 0.85),
    (MIX_SOFT, None, None),
]
# continuing a base that already passed the notch stages: the full mix only
STAGES_SOFT = [(MIX_SOFT, None, None)]
# continuing a soft base whose bound is naming by example: that kind (and its twin form) weighted up
MIX_NAMING = {**MIX_SOFT, "naming_example": 10, "naming_notch": 2}
STAGES_NAMING = [(MIX_NAMING, None, None)]
# attributes of one object among several ("what colour is the circle?": find the object by one
# attribute, read another) take two hops: the key word fetches the object's token, the answer reads
# what was fetched. Weighting that question up alone (10 of ~42) moved nothing in 1250 steps: the model
# answered with the colours present. `binding` teaches the first hop alone (the answer says the key
# word right before the asked word), then `attributes` weights the question up with it in place.
MIX_BINDING = {**MIX_NAMING, "attribute": 6, "binding": 6}
STAGES_BINDING = [(MIX_BINDING, None, None)]
MIX_ATTRIBUTES = {**{k: v * 0.25 for k, v in MIX_NAMING.items()}, "attribute": 12, "binding": 4}
STAGES_ATTRIBUTES = [(MIX_ATTRIBUTES, None, None)]


# the gated curriculum: each stage's mix until its probe reaches the bar, then the next
STAGES = [
    ({"single_attribute": 1, "single_check": 1}, "single_check", 0.9),
    ({"single_attribute": 1, "single_check": 1, "position": 1, "attribute": 1, "existence": 2, "caption": 0.5},
     "existence", 0.85),
    ({**MIX, "naming_words": 4, "naming_text": 2, "naming_example": 2}, "naming_words", 0.85),
    (MIX, None, None),
]


def mix_at(frac: float, ramp: float = 0.4) -> dict[str, float]:
    """The task mix at `frac` of pretraining: START moving to MIX, then MIX."""
    t = min(1.0, frac / ramp) if ramp > 0 else 1.0
    return {k: (1 - t) * START.get(k, 0.0) + t * MIX.get(k, 0.0) for k in {*START, *MIX}}


def sample_task(rng: random.Random, mix: dict[str, float] = MIX) -> Task:
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    return MAKERS[kind](rng)

CURRICULA = {"base": STAGES, "notch": STAGES_NOTCH, "soft": STAGES_SOFT, "naming": STAGES_NAMING,
             "attributes": STAGES_ATTRIBUTES, "binding": STAGES_BINDING}
