"""Reader for the Yo'LLaVA dataset layout.

Layout under a dataset root `DIR` (the public release calls it `yollava-data/`)::

    DIR/train/<subject>/*.png|jpg|jpeg|webp      training photos of each subject
    DIR/test/<subject>/*.png|...                 held-out photos (recognition + QA)
    DIR/test/<subject>/negatives/<kind>/*.png    extra held-out negatives of one kind (optional;
                                                 e.g. `hard`: look-alikes of the subject)
    DIR/yollava-visual-qa.json                   visual multiple-choice QA (optional)
    DIR/**/<subject>-text-only-conversation.json text-only conversations (optional)
    DIR/**/<subject>/text-only-conversation.json   (either name)

Only files directly inside `train/<subject>/` and `test/<subject>/` are
photos of the subject: sub-folders such as the release's
`train/<subject>/negative_example/` (retrieved negatives) are not read, nor
are hidden files (`.DS_Store`, `._1.png`).

Visual QA json (the benchmark file, verbatim)::

    {subject: {image_path: {"question": str, "options": {"A": str, "B": str},
                            "correct_answer": "A" | "B"}}}

Text-only conversation json (the public repo keeps one per subject at
`example_training_data/<subject>/text-only-conversation.json`)::

    {image_path: [{"Human": str, "AI": str}, ...]}

Image paths in both files carry the authors' folder prefix
(`./yollava-data/test/bo/3.png`, `./data/train/bo/3.png`); they are mapped
onto `DIR` by their last three parts `<split>/<subject>/<file>`. A path that
is absolute, contains `..`, or resolves (through a symlink) outside `DIR` is
refused, and so is any listed photo that resolves outside `DIR`.

`read_visual_qa` and `read_conversations` parse and validate the json alone
(no photos needed); `YollavaDataset.load` resolves the paths against `DIR`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
SPLITS = ("train", "test")
VISUAL_QA_FILE = "yollava-visual-qa.json"
CONVERSATION_FILE = "text-only-conversation.json"
SKS = "<sks>"
OTHERS = "others"  # the negative kind of other subjects' test photos
# Pillow's own decompression-bomb threshold (~89.5 Mpx) is the default limit.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class DatasetError(ValueError):
    """A dataset file or path that cannot be used; the message names the value."""


@dataclass(frozen=True)
class RawQA:
    """One visual QA entry exactly as the json gives it (paths unresolved, `<sks>` kept)."""

    subject: str
    image: str
    question: str
    options: dict[str, str]
    answer: str


@dataclass(frozen=True)
class Turn:
    """One question/answer pair of a text-only conversation."""

    human: str
    ai: str


@dataclass(frozen=True)
class RawConversation:
    """The turns generated from one training photo, path unresolved."""

    image: str
    turns: list[Turn]


@dataclass(frozen=True)
class QAItem:
    """A visual QA question about `subject`, asked on the photo `image`."""

    subject: str
    image: Path
    question: str
    options: dict[str, str]
    answer: str


@dataclass(frozen=True)
class Conversation:
    """Text-only turns about `subject`, generated while looking at `image`.

    `image` is resolved and checked to lie inside the root but need not exist:
    the turns are trained without the photo.
    """

    subject: str
    image: Path
    turns: list[Turn]


@dataclass(frozen=True)
class Subject:
    """One subject's photos, each list in natural file-name order."""

    name: str
    train_images: list[Path]
    test_images: list[Path]
    test_negatives: dict[str, list[Path]] = field(default_factory=dict)  # kind -> photos


@dataclass
class YollavaDataset:
    """A loaded dataset: subjects, visual QA items and text-only conversations."""

    root: Path
    subjects: dict[str, Subject]
    qa: list[QAItem] = field(default_factory=list)
    conversations: dict[str, list[Conversation]] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        root: str | os.PathLike,
        subjects: Iterable[str] | None = None,
        identifier: Callable[[str], str] | None = None,
    ) -> YollavaDataset:
        """Read the dataset under `root`.

        subjects: the subjects to load (each must have a `train/` or `test/`
            folder, else DatasetError); None loads every subject found.
        identifier: maps a subject name to the token text that replaces
            `<sks>` (and `<subject>`) in questions and conversations;
            default `<subject>`.

        QA items whose photo is missing are skipped with one warning listing
        them; QA items and conversations of subjects not loaded are dropped.
        """
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"dataset root {str(root)!r} is not a directory")
        root_path = root_path.resolve()
        ident = identifier or _default_identifier
        found = _discover_subjects(root_path, subjects)
        loaded = {name: _load_subject(root_path, name) for name in found}
        qa = _load_qa(root_path, loaded, ident)
        conversations = _load_conversations(root_path, loaded, ident)
        return cls(root_path, loaded, qa, conversations)


def recognition_negatives(dataset: YollavaDataset, subject: str) -> dict[str, list[Path]]:
    """Negatives by kind: `others` (every other subject's test photos, as the paper
    evaluates) and each of the subject's own `negatives/<kind>/` folders."""
    _, others = recognition_split(dataset, subject)
    return {OTHERS: others, **dataset.subjects[subject].test_negatives}


def recognition_split(dataset: YollavaDataset, subject: str) -> tuple[list[Path], list[Path]]:
    """(positives, negatives) for recognition of `subject`, as Yo'LLaVA evaluates it.

    Positives are the subject's held-out test photos; negatives are the test
    photos of every other subject, in subject order.
    """
    if subject not in dataset.subjects:
        raise DatasetError(f"subject {subject!r} is not in the dataset "
                           f"(have {sorted(dataset.subjects)})")
    positives = list(dataset.subjects[subject].test_images)
    negatives = [p for name, s in dataset.subjects.items() if name != subject
                 for p in s.test_images]
    return positives, negatives


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Verify and fully decode `path`; return it as an RGB image.

    Raises FileNotFoundError for a missing file and DatasetError (naming the
    file) for one that is not a decodable image, is truncated or corrupt, or
    has more than `max_pixels` pixels (checked from the header, before
    decoding). Pillow's own hard limit (2 x `Image.MAX_IMAGE_PIXELS`) applies
    on top, whatever `max_pixels` says.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    # Pillow's decoders raise many exception types on hostile input: all mean "not an image".
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as e:
        raise DatasetError(f"image {str(path)!r} is not a decodable image: {e}") from e
    width, height = size
    if width * height > max_pixels:
        raise DatasetError(f"image {str(path)!r} has {width}x{height} pixels, "
                           f"more than max_pixels={max_pixels}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:
        raise DatasetError(f"image {str(path)!r} is not a decodable image: {e}") from e


# --- json parsing (no photos needed) ---------------------------------------------------------


def read_visual_qa(json_path: str | os.PathLike) -> list[RawQA]:
    """Parse and validate a visual QA json in the benchmark's nested format.

    Entries come back in file order. Errors name the subject, image key and field.
    """
    data = _read_json(json_path)
    _expect(isinstance(data, dict), f"{str(json_path)!r}: top level must be an object "
            f"{{subject: {{image_path: entry}}}}, got {type(data).__name__}")
    items = []
    for subject, entries in data.items():
        _expect(isinstance(entries, dict), f"{str(json_path)!r}: subject {subject!r} must map "
                f"image paths to entries, got {type(entries).__name__}")
        for image, entry in entries.items():
            items.append(_parse_qa_entry(subject, image, entry))
    return items


def _parse_qa_entry(subject: str, image: str, entry: object) -> RawQA:
    where = f"visual QA subject {subject!r} image {image!r}"
    _expect(isinstance(entry, dict), f"{where}: entry must be an object, "
            f"got {type(entry).__name__}")
    question = entry.get("question")
    options = entry.get("options")
    answer = entry.get("correct_answer")
    _expect(isinstance(question, str) and question.strip() != "",
            f"{where}: field 'question' must be a non-empty string, got {question!r}")
    _expect(isinstance(options, dict) and len(options) >= 2,
            f"{where}: field 'options' must be an object with at least 2 options, "
            f"got {options!r}")
    for key, text in options.items():
        _expect(isinstance(text, str), f"{where}: field 'options' value for {key!r} "
                f"must be a string, got {text!r}")
    _expect(isinstance(answer, str) and answer in options,
            f"{where}: field 'correct_answer' must be one of {sorted(options)}, got {answer!r}")
    return RawQA(subject, image, question, dict(options), answer)


def read_conversations(json_path: str | os.PathLike) -> list[RawConversation]:
    """Parse and validate a text-only conversation json `{image_path: [{"Human", "AI"}]}`.

    Entries come back in file order, turns in their given order.
    """
    data = _read_json(json_path)
    _expect(isinstance(data, dict), f"{str(json_path)!r}: top level must be an object "
            f"{{image_path: [turns]}}, got {type(data).__name__}")
    conversations = []
    for image, turns in data.items():
        where = f"{str(json_path)!r} image {image!r}"
        _expect(isinstance(turns, list), f"{where}: must be a list of turns, "
                f"got {type(turns).__name__}")
        conversations.append(RawConversation(image, [_parse_turn(where, i, t)
                                                     for i, t in enumerate(turns)]))
    return conversations


def _parse_turn(where: str, index: int, turn: object) -> Turn:
    _expect(isinstance(turn, dict), f"{where} turn {index}: must be an object, "
            f"got {type(turn).__name__}")
    for key in ("Human", "AI"):
        _expect(isinstance(turn.get(key), str),
                f"{where} turn {index}: field {key!r} must be a string, got {turn.get(key)!r}")
    return Turn(turn["Human"], turn["AI"])


def _read_json(json_path: str | os.PathLike) -> object:
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{str(json_path)!r} is not valid json: {e}") from e


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        _expect(key not in out, f"duplicate json key {key!r}")
        out[key] = value
    return out


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise DatasetError(message)


# --- paths -----------------------------------------------------------------------------------


def resolve_image_path(root: Path, raw: str) -> Path:
    """Map a json image path onto `root` by its trailing `<split>/<subject>/<file>`.

    `./yollava-data/test/bo/3.png` -> `root/test/bo/3.png`. Refuses absolute
    paths, `..`, backslashes, an unknown split, a non-image suffix, and any
    path that resolves (through symlinks) outside `root`.
    """
    if not isinstance(raw, str) or raw == "":
        raise DatasetError(f"image path {raw!r} must be a non-empty string")
    if "\\" in raw or PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).drive:
        raise DatasetError(f"image path {raw!r} must be a relative POSIX path")
    parts = [p for p in PurePosixPath(raw).parts if p != "."]
    if ".." in parts:
        raise DatasetError(f"image path {raw!r} must not contain '..'")
    if len(parts) < 3 or parts[-3] not in SPLITS:
        raise DatasetError(f"image path {raw!r} must end in <split>/<subject>/<file> "
                           f"with split in {SPLITS}")
    if PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        raise DatasetError(f"image path {raw!r} must end in one of {sorted(IMAGE_SUFFIXES)}")
    return _inside(root, root.joinpath(*parts[-3:]), raw)


def _inside(root: Path, path: Path, shown: object) -> Path:
    """`path` if it resolves inside `root` (symlinks followed), else DatasetError."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise DatasetError(f"path {str(shown)!r} resolves outside the dataset root {str(root)!r}")
    return path


def natural_key(name: str) -> tuple:
    """Sort key ordering `9.png` before `10.png`; ties broken by the name itself."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def _check_subject_name(name: object) -> str:
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or name.startswith(".")):
        raise DatasetError(f"subject name {name!r} must be a plain folder name")
    return name


def _discover_subjects(root: Path, subjects: Iterable[str] | None) -> list[str]:
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if not split_dirs:
        raise DatasetError(f"dataset root {str(root)!r} has neither train/ nor test/")
    present = {p.name for d in split_dirs for p in d.iterdir()
               if p.is_dir() and not p.name.startswith(".")}
    if subjects is None:
        return sorted(present, key=natural_key)
    if isinstance(subjects, str):
        raise TypeError(f"subjects must be a list of names, not the string {subjects!r}")
    wanted = [_check_subject_name(s) for s in subjects]
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DatasetError(f"subjects {missing} not found under {str(root)!r} "
                           f"train/ or test/ (have {sorted(present)})")
    return sorted(set(wanted), key=natural_key)


def _load_subject(root: Path, name: str) -> Subject:
    negatives = {}
    neg_root = root / "test" / name / "negatives"
    if neg_root.is_dir():
        for kind in sorted(p.name for p in neg_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            _check_subject_name(kind)  # the same charset rules as a subject folder
            if kind == OTHERS:
                raise DatasetError(f"{neg_root / kind}: {OTHERS!r} is reserved for other subjects' photos")
            negatives[kind] = _list_images(root, neg_root / kind)
    return Subject(name, _list_images(root, root / "train" / name),
                   _list_images(root, root / "test" / name), negatives)


def _list_images(root: Path, folder: Path) -> list[Path]:
    """Image files directly in `folder` (not sub-folders, not hidden), natural order."""
    if not folder.is_dir():
        return []
    _inside(root, folder, folder)
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    return [_inside(root, p, p) for p in sorted(files, key=lambda p: natural_key(p.name))]


# --- resolution against the root -------------------------------------------------------------


def _default_identifier(subject: str) -> str:
    return f"<{subject}>"


def _with_identifier(text: str, subject: str, ident: Callable[[str], str]) -> str:
    """Replace `<sks>` and `<subject>` by the caller's identifier text."""
    token = ident(subject)
    return text.replace(SKS, token).replace(f"<{subject}>", token)


def _load_qa(root: Path, subjects: dict[str, Subject],
             ident: Callable[[str], str]) -> list[QAItem]:
    json_path = root / VISUAL_QA_FILE
    if not json_path.is_file():
        return []
    items, missing = [], []
    for raw in read_visual_qa(json_path):
        if raw.subject not in subjects:
            continue
        image = resolve_image_path(root, raw.image)
        if not image.is_file():
            missing.append(raw.image)
            continue
        items.append(QAItem(raw.subject, image, _with_identifier(raw.question, raw.subject, ident),
                            raw.options, raw.answer))
    if missing:
        warnings.warn(f"skipped {len(missing)} visual QA item(s) whose photo is missing "
                      f"under {str(root)!r}: {missing}", stacklevel=3)
    return sorted(items, key=lambda q: (natural_key(q.subject),
                                        natural_key(str(q.image.relative_to(root)))))


def _find_conversation_files(root: Path, subjects: Iterable[str]) -> dict[str, Path]:
    """Map subject -> its conversation json anywhere under root (symlinks not followed).

    Accepted names: `<subject>-text-only-conversation.json`, or
    `text-only-conversation.json` inside a folder named `<subject>`.
    Two files for one subject is an error.
    """
    wanted = set(subjects)
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        for fname in filenames:
            subject = _conversation_subject(folder, fname)
            if subject in wanted:
                found.setdefault(subject, []).append(_inside(root, folder / fname, folder / fname))
    duplicated = {s: [str(p) for p in ps] for s, ps in found.items() if len(ps) > 1}
    if duplicated:
        raise DatasetError(f"more than one text-only conversation file for a subject: {duplicated}")
    return {s: ps[0] for s, ps in found.items()}


def _conversation_subject(folder: Path, fname: str) -> str | None:
    suffix = "-" + CONVERSATION_FILE
    if fname.endswith(suffix) and len(fname) > len(suffix):
        return fname[: -len(suffix)]
    if fname == CONVERSATION_FILE:
        return folder.name
    return None


def _load_conversations(root: Path, subjects: dict[str, Subject],
                        ident: Callable[[str], str]) -> dict[str, list[Conversation]]:
    out = {}
    for subject, path in sorted(_find_conversation_files(root, subjects).items()):
        convs = [Conversation(subject, resolve_image_path(root, raw.image),
                              [Turn(_with_identifier(t.human, subject, ident),
                                    _with_identifier(t.ai, subject, ident)) for t in raw.turns])
                 for raw in read_conversations(path)]
        out[subject] = sorted(convs, key=lambda c: natural_key(str(c.image.relative_to(root))))
    return out


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder` (no sub-folders, no hidden files), natural order."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"photo folder {str(folder)!r} is not a directory")
    root = path.resolve()
    return _list_images(root, root)
