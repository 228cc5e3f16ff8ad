"""The artifact store's interface: errors, keys, the object layer and the concept layer.

Two layers. The object layer (`put_bytes`, `get_bytes`, `exists`, `list_prefix`,
`delete_prefix`, `delete_key`, `put_file`, `get_file`) maps validated keys such
as `jobs/j1/summary.json` to bytes; each backend implements it (`FileStore` in
`cluster.store`, `S3Store` in `cluster.store_s3`). The concept layer, shared by
all, lays concepts out as

    concepts/<owner>/<name>/v<N>/concept.safetensors
    concepts/<owner>/<name>/v<N>/manifest.json

    concepts/<owner>/<name>/v<N>/claims/<writer>      who is writing version N
    concepts/<owner>/<name>/incarnation.json         this life of the concept (grants name it)

A writer first *claims* a version number: it writes its own claim object
(a key no one else writes), then lists the version's folder, and holds the
number only if its claim is the only one there and no manifest is; otherwise
it removes its claim and tries the next number. With a store that lists what
was written before (S3 since 2020, MinIO, a local disk), at most one of any
number of racing writers can see itself alone, so no two writers ever write
one version, whatever the store does with conditional writes. Then tensors,
then the manifest last, with a create-if-absent write (`put_if_absent`:
`link()` on files, `If-None-Match: *` on S3) as a second lock on the door. A
version without a manifest does not exist: listings skip it; one that a
killed writer had claimed is never reused (its number stays unused), one
without a claim (written by code before claims) is overwritten by the next
put. Every read goes through `ConceptArtifact.from_bytes`, which checks the
tensors against the manifest. The layout is the one readers before claims
read: claims and the incarnation are objects they never look at.

Import the store from `cluster.store` (which re-exports these names and opens
stores by URI); this module exists so that the backends depend on the
interface and not on each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import socket
import time
import uuid
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from yollava.artifacts import MANIFEST_FILE, TENSORS_FILE, ArtifactError, ConceptArtifact
from yollava.tokens import check_name

CONCEPTS = "concepts"
MiB = 1024 * 1024
CLAIMS = "claims"
INCARNATION_FILE = "incarnation.json"
_MANIFEST_KEY_RE = re.compile(rf"^{CONCEPTS}/([^/]+)/([^/]+)/v([1-9][0-9]*)/{re.escape(MANIFEST_FILE)}$")
# A version number in use: a manifest (complete) or a claim (being written, or its writer died).
_USED_KEY_RE = re.compile(rf"^{CONCEPTS}/[^/]+/[^/]+/v([1-9][0-9]*)/({re.escape(MANIFEST_FILE)}|{CLAIMS}/[^/]+)$")
MAX_CLAIM_ATTEMPTS = 64
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
    """An explicitly requested version is already complete (or claimed); versions are never overwritten."""


class VersionConflict(RuntimeError):
    """A version could not be claimed, or was committed by a writer that had not claimed it."""


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
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `data` under `key` only if no object is there; True if written, False if one was.

        Readers see the whole object or none. Atomic where the backend is
        (files: `link()`; S3: `If-None-Match: *`); the concept layer's version
        claims do not depend on it.
        """

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
        """Store `artifact` as the next free version (or as `version`, if that one is free); return it.

        The number is claimed first (see the module's docstring), so racing
        writers of one concept each get their own version; an explicit
        `version` that is complete or claimed raises ConceptExists.
        """
        owner, name = artifact.owner, artifact.name
        _concept_dir(owner, name)  # a bad owner or name is refused before any object is touched
        if version is not None:
            _check_version(version)
        writer = uuid.uuid4().hex
        claim = json.dumps({"writer": writer, "host": socket.gethostname(), "pid": os.getpid(),
                            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()
        for attempt in range(MAX_CLAIM_ATTEMPTS):
            number = version if version is not None else self._next_version(owner, name)
            if self._claim(owner, name, number, writer, claim):
                self._commit(artifact, number)
                return number
            if version is not None:
                raise ConceptExists(f"concept {owner}/{name} version {version} already exists or is being written")
            time.sleep(random.uniform(0, min(0.25, 0.002 * 2 ** attempt)))  # racing writers drift apart
        raise VersionConflict(f"concept {owner}/{name}: no version could be claimed in {MAX_CLAIM_ATTEMPTS} "
                              "attempts (too many writers of one concept at once)")

    def _next_version(self, owner: str, name: str) -> int:
        keys = self.list_prefix(_concept_dir(owner, name))
        used = [int(m[1]) for m in map(_USED_KEY_RE.match, keys) if m]
        return max(used, default=0) + 1

    def _claim(self, owner: str, name: str, version: int, writer: str, body: bytes) -> bool:
        """Hold `version` if this writer's claim is the only one in its folder and no manifest is there."""
        folder = _version_dir(owner, name, version)
        mine = f"{folder}/{CLAIMS}/{writer}"
        self.put_bytes(mine, body)
        present = self.list_prefix(folder)
        claims = [k for k in present if k.startswith(f"{folder}/{CLAIMS}/")]
        if claims == [mine] and f"{folder}/{MANIFEST_FILE}" not in present:
            return True
        self.delete_key(mine)
        return False

    def _commit(self, artifact: ConceptArtifact, version: int) -> None:
        """Tensors, then the manifest (create-if-absent) of a claimed version."""
        tensors, manifest = dataclasses.replace(artifact, version=version).to_bytes()
        folder = _version_dir(artifact.owner, artifact.name, version)
        self.put_bytes(f"{folder}/{TENSORS_FILE}", tensors)
        if self.put_if_absent(f"{folder}/{MANIFEST_FILE}", manifest):
            return
        # A manifest was there: ours, if a retried request had landed the first time; else a writer
        # that never claimed (code from before claims) committed this number under us.
        if self.get_bytes(f"{folder}/{MANIFEST_FILE}") != manifest:
            raise VersionConflict(f"concept {artifact.owner}/{artifact.name} version {version} was committed by "
                                  "a writer that had not claimed it; stop writers older than version claims")

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

    def read_manifest(self, owner: str, name: str, version: int) -> dict | None:
        """The manifest of a version as stored (not integrity-checked: `get_concept` is), or None."""
        try:
            return json.loads(self.get_bytes(f"{_version_dir(owner, name, version)}/{MANIFEST_FILE}"))
        except ObjectNotFound:
            return None

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
        """Delete one version or (by default) all; manifests go first. Returns the versions deleted.

        When no complete version is left, the whole concept goes, its claims and
        incarnation included: a concept trained again under the name is a new one.
        """
        complete = self.versions(owner, name)
        doomed = complete if version is None else sorted({_check_version(version)} & set(complete))
        for v in doomed:
            self.delete_key(f"{_version_dir(owner, name, v)}/{MANIFEST_FILE}")
        if version is not None:
            self.delete_prefix(_version_dir(owner, name, version))
        if version is None or not self.versions(owner, name):
            self.delete_prefix(_concept_dir(owner, name))
        return doomed

    def incarnation(self, owner: str, name: str, create: bool = False) -> str | None:
        """The id of this life of the concept (from its first share to its deletion), or None.

        With `create`, one is made if the concept has a complete version
        (ConceptNotFound if it has none). Deleting the concept deletes it, so
        anything tied to an incarnation (grants) dies with the concept.
        """
        key = f"{_concept_dir(owner, name)}/{INCARNATION_FILE}"
        try:
            return self.get_json(key)["id"]
        except ObjectNotFound:
            if not create:
                return None
        if not self.versions(owner, name):
            raise ConceptNotFound(owner, name)
        self.put_if_absent(key, json.dumps({"id": uuid.uuid4().hex}).encode())
        return self.get_json(key)["id"]  # ours, or that of a writer who was first


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
