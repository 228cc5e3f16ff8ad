"""The artifact store's interface: errors, keys, the object layer and the concept layer.

Two layers. The object layer (`put_bytes`, `get_bytes`, `exists`, `list_prefix`,
`delete_prefix`, `delete_key`, `put_file`, `get_file`) maps validated keys such
as `jobs/j1/summary.json` to bytes; each backend implements it (`FileStore` in
`cluster.store`, `S3Store` in `cluster.store_s3`). The concept layer, shared by
all, lays concepts out as

    concepts/<owner>/<name>/v<N>/concept.safetensors
    concepts/<owner>/<name>/v<N>/manifest.json

Tensors are written first and the manifest last: a version without a manifest
does not exist (listings skip it, the next put overwrites it), so a killed
writer leaves nothing a reader can load. Every read goes through
`ConceptArtifact.from_bytes`, which checks the tensors against the manifest.
One writer per concept at a time (a job trains each subject on one worker);
two concurrent puts of the same concept can race for the same version.

Import the store from `cluster.store` (which re-exports these names and opens
stores by URI); this module exists so that the backends depend on the
interface and not on each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from yollava.artifacts import MANIFEST_FILE, TENSORS_FILE, ArtifactError, ConceptArtifact
from yollava.tokens import check_name

CONCEPTS = "concepts"
MiB = 1024 * 1024
_MANIFEST_KEY_RE = re.compile(rf"^{CONCEPTS}/([^/]+)/([^/]+)/v([1-9][0-9]*)/{re.escape(MANIFEST_FILE)}$")
_S3_MODULE = "cluster.store_s3"


class ObjectNotFound(KeyError):
    """No object under this key."""

    def __str__(self) -> str:
        return str(self.args[0])


class ConceptNotFound(KeyError):
    """No complete version of this concept (or of this version of it)."""

    def __init__(self, owner: str, name: str, version: int | None = None):
        which = "any version" if version is None else f"version {version}"
        super().__init__(f"concept {owner}/{name}: {which} not found")
        self.owner, self.name, self.version = owner, name, version

    def __str__(self) -> str:
        return str(self.args[0])


class ConceptExists(ValueError):
    """An explicitly requested version is already complete; versions are never overwritten."""


@dataclasses.dataclass(frozen=True, order=True)
class ConceptRef:
    """A concept in the store and its latest complete version."""

    owner: str
    name: str
    version: int


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise ValueError naming it.

    Parts are separated by `/`; none may be empty or start with `.` (no `..`,
    no hidden temp files), and no backslashes, control characters or leading `/`.
    """
    valid = (isinstance(key, str) and not any(c == "\\" or ord(c) < 32 for c in key)
             and all(part and not part.startswith(".") for part in key.split("/")))
    if not valid:
        raise ValueError(f"key={key!r} is not a valid store key: use non-empty '/'-separated parts "
                         "that do not start with '.', without backslashes or control characters")
    return key


def check_prefix(prefix: str) -> str:
    """'' (the whole root) or a key naming a folder; one trailing '/' is allowed."""
    return prefix if prefix == "" else check_key(prefix.removesuffix("/"))


def _check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version={version!r} must be a positive integer")
    return version


class ArtifactStore(ABC):
    """Object layer (abstract, per backend) and concept layer (shared) over one root."""

    uri: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- object layer --------------------------------------------------------------

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` under `key`, replacing any object there; readers see old or new, never half."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object under `key`; ObjectNotFound if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abstractmethod
    def list_prefix(self, prefix: str = "") -> list[str]:
        """Sorted keys below the folder `prefix` ('' for all), never a sibling sharing its first letters."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object below the folder `prefix` (not '') and return how many there were."""

    @abstractmethod
    def delete_key(self, key: str) -> None:
        """Delete the object under `key`, if any."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file (multipart on S3 when large)."""

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> Path:
        """Download to a local file, written atomically; ObjectNotFound if there is none."""

    def put_json(self, key: str, obj: Any) -> None:
        """Write a JSON document (job summaries, done-markers)."""
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        """Read a JSON document; ObjectNotFound if there is none."""
        return json.loads(self.get_bytes(key))

    # -- concept layer -------------------------------------------------------------

    def put_concept(self, artifact: ConceptArtifact, version: int | None = None) -> int:
        """Store `artifact` as the next version (or as `version`, if that one is free); return it."""
        existing = self.versions(artifact.owner, artifact.name)
        if version is None:
            version = existing[-1] + 1 if existing else 1
        elif _check_version(version) in existing:
            raise ConceptExists(f"concept {artifact.owner}/{artifact.name} version {version} already exists")
        tensors, manifest = dataclasses.replace(artifact, version=version).to_bytes()
        folder = _version_dir(artifact.owner, artifact.name, version)
        self.put_bytes(f"{folder}/{TENSORS_FILE}", tensors)
        self.put_bytes(f"{folder}/{MANIFEST_FILE}", manifest)
        return version

    def get_concept(self, owner: str, name: str, version: int | None = None,
                    expect_fingerprint: str | None = None) -> ConceptArtifact:
        """Load a version (the latest complete one by default), integrity-checked."""
        if version is None:
            version = self.latest_version(owner, name)
            if version is None:
                raise ConceptNotFound(owner, name)
        folder = _version_dir(owner, name, version)
        try:
            manifest = self.get_bytes(f"{folder}/{MANIFEST_FILE}")
        except ObjectNotFound:
            raise ConceptNotFound(owner, name, version) from None
        try:
            tensors = self.get_bytes(f"{folder}/{TENSORS_FILE}")
        except ObjectNotFound:
            raise ArtifactError(f"concept {owner}/{name} version {version} has a manifest but no tensors") from None
        artifact = ConceptArtifact.from_bytes(tensors, manifest, expect_fingerprint)
        _check_location(artifact, owner, name, version)
        return artifact

    def versions(self, owner: str, name: str) -> list[int]:
        """Complete versions (those with a manifest), sorted."""
        keys = self.list_prefix(_concept_dir(owner, name))
        return sorted(int(m[3]) for m in map(_MANIFEST_KEY_RE.match, keys) if m)

    def latest_version(self, owner: str, name: str) -> int | None:
        """The newest complete version, or None if there is none."""
        return max(self.versions(owner, name), default=None)

    def list_concepts(self, owner: str | None = None) -> list[ConceptRef]:
        """Every concept (of `owner`, if given) with its latest complete version, sorted."""
        prefix = CONCEPTS if owner is None else f"{CONCEPTS}/{check_name(owner, 'owner')}"
        latest: dict[tuple[str, str], int] = {}
        for m in map(_MANIFEST_KEY_RE.match, self.list_prefix(prefix)):
            if m:
                latest[m[1], m[2]] = max(int(m[3]), latest.get((m[1], m[2]), 0))
        return sorted(ConceptRef(o, n, v) for (o, n), v in latest.items())

    def delete_concept(self, owner: str, name: str, version: int | None = None) -> list[int]:
        """Delete one version or (by default) all; manifests go first. Returns the versions deleted."""
        complete = self.versions(owner, name)
        doomed = complete if version is None else sorted({_check_version(version)} & set(complete))
        for v in doomed:
            self.delete_key(f"{_version_dir(owner, name, v)}/{MANIFEST_FILE}")
        folder = _concept_dir(owner, name) if version is None else _version_dir(owner, name, version)
        self.delete_prefix(folder)
        return doomed


def _concept_dir(owner: str, name: str) -> str:
    return f"{CONCEPTS}/{check_name(owner, 'owner')}/{check_name(name, 'name')}"


def _version_dir(owner: str, name: str, version: int) -> str:
    return f"{_concept_dir(owner, name)}/v{_check_version(version)}"


def _check_location(artifact: ConceptArtifact, owner: str, name: str, version: int) -> None:
    """Refuse a manifest stored under another concept's path (copied or moved by hand)."""
    found = (artifact.owner, artifact.name, artifact.version)
    if found != (owner, name, version):
        raise ArtifactError(f"concept stored as {owner}/{name} version {version} says it is "
                            f"{found[0]}/{found[1]} version {found[2]}")


def redact(url: str | None) -> str | None:
    """`url` with any user:password@ in its host part replaced by ***@ (for messages and logs)."""
    parts = urlsplit(url or "")
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
