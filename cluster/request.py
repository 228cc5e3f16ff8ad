"""A personalization request: the file a user writes, checked before any GPU is asked for.

Three levels of failure. A *malformed* request (a missing or unknown field, a
name outside the strict pattern, an unknown recipe field) fails at once with
`RequestError` naming the field. A *bad subject* (no photos, a missing,
undecodable, truncated or oversized photo, a name used twice) is reported by
owner/name and reason, and the other subjects go on. A store that cannot be
reached or refuses access (no credentials, a bad endpoint, a denied request)
is nobody's photo problem: `SourceUnavailable` stops the job, naming the
subject and the source; so does any other error (a bug is not a bad photo).

Photos are read and fully decoded here, on the driver, and kept as bytes with
their sha256: the same bytes are shipped to the workers (through Ray's object
store) so a worker never reads a path that exists only on the submitting
machine, and the subject's key is the hash of exactly what it trains on.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

import yaml
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.store import ObjectNotFound, access_errors
from yollava.data import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, DatasetError, list_images, load_image
from yollava.mining import image_sha256
from yollava.recipe import RecipeConfig
from yollava.tokens import check_name

MiB = 1024 * 1024
DEFAULT_MAX_PHOTO_BYTES = 32 * MiB


class RequestError(ValueError):
    """A malformed request: the message names the field (e.g. `subjects.1.name`)."""


class PhotoPolicy(Protocol):
    """What `check_subjects` needs of an owner policy (`cluster.policy.OwnerPolicy`)."""

    def check_request(self, subjects: list[tuple[str, str, list[str]]], negatives: list[str]) -> None: ...

    def checker(self, owner: str, what: str) -> Callable[[str], None]: ...


class SourceUnavailable(RuntimeError):
    """Photos could not be read because their store could not be reached or refused access."""


# Why a photo source cannot be used that is the source's own problem: a missing file, folder
# or object, one that cannot be read, an undecodable, truncated or oversized image
# (DatasetError, a ValueError, as are the bad-URI and bad-key errors).
PHOTO_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, PermissionError, ObjectNotFound, ValueError,
                                              UnidentifiedImageError, Image.DecompressionBombError)

# A list of files and folders (paths or s3:// URIs; an s3:// entry ending in "/" is a prefix),
# a folder, or an s3:// prefix.
PhotoSource = list[str] | str


class SubjectEntry(BaseModel):
    """One subject to personalize."""

    model_config = ConfigDict(extra="forbid")

    owner: str = Field(description="namespace of the user who owns the subject")
    name: str = Field(description="concept name: <name> in prompts")
    photos: PhotoSource = Field(description="list of image files and folders, a folder, or an s3:// prefix")
    description: str | None = Field(default=None, description="free text, kept with the job record")

    @field_validator("owner", "name")
    @classmethod
    def _strict_name(cls, value: str, info) -> str:
        return check_name(value, info.field_name)


class PersonalizationRequest(BaseModel):
    """The whole request file: one base model, one store, one recipe, many subjects."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, description="HF id, local path, or 'tiny'")
    store: str = Field(min_length=1, description="file:///path, a local path, or s3://bucket/prefix")
    recipe: dict[str, Any] = Field(default_factory=dict, description="overrides of RecipeConfig defaults")
    negatives: PhotoSource | None = Field(default=None, description="pool of negative images")
    subjects: list[SubjectEntry] = Field(min_length=1)

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, value: dict) -> dict:
        RecipeConfig.from_dict(value)  # unknown fields and bad values raise ValueError naming them
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("", "file", "s3"):
            raise ValueError(f"store={value!r}: use file:///path, a local path or s3://bucket/prefix")
        return value

    def recipe_config(self) -> RecipeConfig:
        return RecipeConfig.from_dict(self.recipe)


# -- reading the file ---------------------------------------------------------------------


def load_request(source: str, overrides: dict[str, Any] | None = None) -> PersonalizationRequest:
    """Parse a YAML/JSON request from a local path or an s3:// URI; `overrides` (CLI) win.

    Relative local photo paths are resolved against the request file's folder
    (against the working directory for a request read from S3).
    """
    raw, base_dir = _read_source(source)
    try:
        data = yaml.safe_load(raw) if not source.endswith(".json") else json.loads(raw)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request {source}: not valid YAML/JSON: {e}") from e
    if not isinstance(data, dict):
        raise RequestError(f"request {source}: the top level must be a mapping of fields")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    data["recipe"] = _recipe_with_file(data.get("recipe", {}), base_dir, source)
    try:
        request = PersonalizationRequest.model_validate(data)
    except ValidationError as e:
        raise RequestError(f"request {source}: {_describe(e)}") from None
    return _resolve_paths(request, base_dir)


def _recipe_with_file(recipe: Any, base_dir: Path, source: str) -> Any:
    """`recipe: {from: FILE, ...}`: the recipe file's fields (FILE relative to the request's
    folder), then the other keys over them; the job records the merged fields."""
    if not isinstance(recipe, dict) or "from" not in recipe:
        return recipe
    rest = {k: v for k, v in recipe.items() if k != "from"}
    ref = recipe["from"]
    if not isinstance(ref, str) or not ref or "://" in ref:
        raise RequestError(f"request {source}: field recipe.from={ref!r} must be a local recipe file path")
    path = (base_dir / ref) if not Path(ref).is_absolute() else Path(ref)
    try:
        return {**RecipeConfig.from_file(path).to_dict(), **rest}
    except (OSError, ValueError) as e:
        raise RequestError(f"request {source}: field recipe.from={ref!r}: {e}") from None


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"field {where}: {msg}")
    return "; ".join(parts)


def _read_source(source: str) -> tuple[bytes, Path]:
    if source.startswith("s3://"):
        bucket, key = _split_s3(source)
        return _s3_reader(bucket).get_bytes(key), Path.cwd()
    path = Path(source)
    if not path.is_file():
        raise RequestError(f"request file {source!r} does not exist")
    return path.read_bytes(), path.absolute().parent


def _resolve_paths(request: PersonalizationRequest, base: Path) -> PersonalizationRequest:
    def fix(src: PhotoSource | None) -> PhotoSource | None:
        if src is None:
            return None
        if isinstance(src, str):
            return src if src.startswith("s3://") else str((base / src).absolute())
        return [s if s.startswith("s3://") else str((base / s).absolute()) for s in src]

    subjects = [s.model_copy(update={"photos": fix(s.photos)}) for s in request.subjects]
    return request.model_copy(update={"subjects": subjects, "negatives": fix(request.negatives)})


# -- photos ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    """One decoded-and-verified photo: where it came from, its bytes and their sha256."""

    source: str
    data: bytes
    sha256: str


@dataclass
class CheckedSubject:
    """A subject after validation: `photos` when valid, else `reason` says why not."""

    owner: str
    name: str
    description: str | None
    photos: list[Photo] = field(default_factory=list)
    reason: str | None = None

    @property
    def valid(self) -> bool:
        return self.reason is None

    @property
    def label(self) -> str:
        return f"{self.owner}/{self.name}"


def read_photos(source: PhotoSource, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_PHOTO_BYTES, check: Callable[[str], None] | None = None) -> list[Photo]:
    """Every photo of a source, read and fully decoded; identical files kept once.

    Raises one of PHOTO_ERRORS (DatasetError, FileNotFoundError, ObjectNotFound...)
    naming the first bad photo; what the store raises when it cannot be reached
    or refuses access (`access_errors()`) passes through. `check(uri)` (the
    owner policy) is called on every photo before its bytes are read, and on
    every folder or prefix before it is listed.
    """
    photos, seen = [], set()
    for item in _entries(source):
        if check is not None:
            check(item)
    for uri, read in _list_source(source):
        if check is not None:
            check(uri)
        data = read()
        if len(data) > max_bytes:
            raise DatasetError(f"image {uri!r} is {len(data)} bytes, more than {max_bytes}")
        check_decodes(uri, data, max_pixels)
        digest = image_sha256(data)
        if digest not in seen:
            seen.add(digest)
            photos.append(Photo(uri, data, digest))
    if not photos:
        raise DatasetError(f"no photos found in {source!r}")
    return photos


def check_decodes(uri: str, data: bytes, max_pixels: int) -> None:
    """Decode `data` with yollava's loader (verify + full decode + pixel limit)."""
    with tempfile.NamedTemporaryFile(suffix=Path(uri).suffix or ".img") as f:
        f.write(data)
        f.flush()
        try:
            load_image(f.name, max_pixels)
        except DatasetError as e:
            raise DatasetError(str(e).replace(repr(f.name), repr(uri))) from None


def _list_source(source: PhotoSource):
    """(uri, read-bytes callable) for each photo a source names.

    A string is a folder or an s3:// prefix; in a list, a local folder or an
    s3:// entry ending in "/" is expanded the same way (and must hold photos),
    any other entry is one file or object.
    """
    if isinstance(source, str):
        yield from _s3_prefix(source) if source.startswith("s3://") else _local_folder(source)
        return
    for item in source:
        if item.startswith("s3://"):
            yield from _nonempty(item, _s3_prefix(item)) if item.endswith("/") else _s3_object(item)
        elif Path(item).is_dir():
            yield from _nonempty(item, _local_folder(item))
        else:
            yield item, lambda p=item: _read_local(p)


def _nonempty(folder: str, photos):
    """`photos`, or DatasetError when a folder named in a list holds none (a slip, not a choice)."""
    found = False
    for photo in photos:
        found = True
        yield photo
    if not found:
        raise DatasetError(f"no photos found in {folder!r}")


def _local_folder(folder: str):
    for p in list_images(folder):
        yield str(p), lambda p=p: _read_local(p)


def _s3_prefix(uri: str):
    """Objects directly under the prefix with an image suffix."""
    bucket, prefix = _split_s3(uri)
    reader = _s3_reader(bucket)
    for key in reader.list_prefix(prefix):
        if Path(key).suffix.lower() in IMAGE_SUFFIXES and "/" not in key[len(prefix):].strip("/"):
            yield f"s3://{bucket}/{key}", lambda r=reader, k=key: r.get_bytes(k)


def _s3_object(uri: str):
    bucket, key = _split_s3(uri)
    reader = _s3_reader(bucket)
    yield uri, lambda: reader.get_bytes(key)


def _read_local(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    return p.read_bytes()


def _split_s3(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise RequestError(f"{uri!r} is not an s3://bucket/key URI")
    return parts.netloc, parts.path.lstrip("/")


def _s3_reader(bucket: str):
    from cluster.store_s3 import S3Store  # boto3 only when S3 is used

    return S3Store(bucket, endpoint_url=s3_endpoint())


def s3_endpoint() -> str | None:
    """The S3 endpoint boto3 would use from the environment, made explicit so it travels to workers."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# -- checking every subject -----------------------------------------------------------------


def check_subjects(request: PersonalizationRequest, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_bytes: int = DEFAULT_MAX_PHOTO_BYTES, policy: PhotoPolicy | None = None) -> list[CheckedSubject]:
    """Read and decode every subject's photos; a bad subject gets a reason, the rest go on.

    With an owner `policy`, every owner and source is checked before any photo
    is read, and every photo before its bytes are: a violation raises
    PolicyError (the whole request is refused).
    """
    if policy is not None:
        policy.check_request([(s.owner, s.name, _entries(s.photos)) for s in request.subjects],
                             _entries(request.negatives) if request.negatives is not None else [])
    counts: dict[tuple[str, str], int] = {}
    for s in request.subjects:
        counts[s.owner, s.name] = counts.get((s.owner, s.name), 0) + 1
    out = []
    for s in request.subjects:
        checked = CheckedSubject(s.owner, s.name, s.description)
        if counts[s.owner, s.name] > 1:
            checked.reason = f"duplicate name: {s.owner}/{s.name} appears {counts[s.owner, s.name]} times"
        else:
            check = policy.checker(s.owner, f"subject {checked.label}") if policy is not None else None
            try:
                checked.photos = read_source(f"subject {checked.label}", s.photos, max_pixels, max_bytes, check)
            except PHOTO_ERRORS as e:  # this subject's problem only
                checked.reason = f"photos: {e}"
        out.append(checked)
    return out


def _entries(source: PhotoSource) -> list[str]:
    return [source] if isinstance(source, str) else list(source)


def read_source(what: str, source: PhotoSource, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_PHOTO_BYTES, check: Callable[[str], None] | None = None) -> list[Photo]:
    """read_photos, where a store that cannot be reached or refuses access raises SourceUnavailable."""
    try:
        return read_photos(source, max_pixels, max_bytes, check)
    except access_errors() as e:
        raise SourceUnavailable(f"{what}: photos {source!r} could not be read: {type(e).__name__}: {e}") from e
