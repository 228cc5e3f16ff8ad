"""The artifact store: concepts and job files under one root, on a local disk or on S3.

Two layers. The object layer (`put_bytes`, `get_bytes`, `exists`, `list_prefix`,
`delete_prefix`, `delete_key`, `put_file`, `get_file`) maps validated keys such
as `jobs/j1/summary.json` to bytes; `FileStore` and `S3Store` implement it. The
concept layer, shared by both, lays concepts out as

    concepts/<owner>/<name>/v<N>/concept.safetensors
    concepts/<owner>/<name>/v<N>/manifest.json

Tensors are written first and the manifest last: a version without a manifest
does not exist (listings skip it, the next put overwrites it), so a killed
writer leaves nothing a reader can load. Every read goes through
`ConceptArtifact.from_bytes`, which checks the tensors against the manifest.
One writer per concept at a time (a job trains each subject on one worker);
two concurrent puts of the same concept can race for the same version.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from yollava.artifacts import MANIFEST_FILE, TENSORS_FILE, ArtifactError, ConceptArtifact, atomic_write
from yollava.tokens import check_name

CONCEPTS = "concepts"
MiB = 1024 * 1024
_MANIFEST_KEY_RE = re.compile(rf"^{CONCEPTS}/([^/]+)/([^/]+)/v([1-9][0-9]*)/{re.escape(MANIFEST_FILE)}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RETRY_MODES = ("standard", "adaptive")
_MISSING_CODES = ("404", "NoSuchKey", "NotFound")


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


def _check_prefix(prefix: str) -> str:
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


# -- local files ------------------------------------------------------------------------


class FileStore(ArtifactStore):
    """A folder on a local (or shared) file system; every write is temp file + fsync + rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _folder(self, prefix: str) -> Path:
        prefix = _check_prefix(prefix)
        return self._path(prefix) if prefix else self.root

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri}: no object {key!r}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_prefix(self, prefix: str = "") -> list[str]:
        keys = []
        for folder, subfolders, files in os.walk(self._folder(prefix)):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            rel = Path(folder).relative_to(self.root)
            keys += [(rel / f).as_posix() for f in files if not f.startswith(".")]
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        if not _check_prefix(prefix):
            raise ValueError(f"refusing to delete the whole store {self.uri}: give a non-empty prefix")
        count = len(self.list_prefix(prefix))
        if self._folder(prefix).is_dir():
            shutil.rmtree(self._folder(prefix))
        return count

    def delete_key(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            atomic_write(self._path(key), lambda f: shutil.copyfileobj(src, f, MiB))

    def get_file(self, key: str, path: str | os.PathLike) -> Path:
        try:
            with self._path(key).open("rb") as src:
                return atomic_write(Path(path), lambda f: shutil.copyfileobj(src, f, MiB))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri}: no object {key!r}") from None


# -- S3 and S3-compatible servers -------------------------------------------------------


class S3Store(ArtifactStore):
    """`s3://bucket/prefix` through boto3: AWS or any S3-compatible server (MinIO, Ceph, R2).

    Credentials come from the usual AWS chain (env, profile, instance role);
    none are accepted here and none appear in repr. The endpoint is
    `endpoint_url`, else whatever boto3 reads itself (`AWS_ENDPOINT_URL_S3`,
    `AWS_ENDPOINT_URL`, the profile), else AWS. Throttling and 5xx answers are
    retried by botocore (`retry_mode` "standard", or "adaptive" to also rate
    limit this client when many workers hit one prefix). Objects above
    `multipart_threshold` bytes are uploaded in parts of `multipart_chunksize`.
    Picklable (for Ray tasks): unpickling builds a fresh client.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region_name: str | None = None, addressing_style: str | None = None,
                 retry_mode: str = "standard", max_attempts: int = 8,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 16 * MiB,
                 max_concurrency: int = 8):
        if not _BUCKET_RE.match(bucket):
            raise ValueError(f"bucket={bucket!r} is not a valid S3 bucket name")
        if retry_mode not in _RETRY_MODES:
            raise ValueError(f"retry_mode={retry_mode!r} must be one of {_RETRY_MODES}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be >= 1")
        self.bucket, self.prefix = bucket, _check_prefix(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._options = dict(endpoint_url=endpoint_url, region_name=region_name,
                             addressing_style=addressing_style, retry_mode=retry_mode, max_attempts=max_attempts)
        self._transfer_options = dict(multipart_threshold=multipart_threshold,
                                      multipart_chunksize=multipart_chunksize, max_concurrency=max_concurrency)
        self._connect()  # a bad endpoint or region fails here, not at a write

    def _connect(self) -> None:
        # Neither the client nor TransferConfig survives pickling (TransferConfig's
        # attribute aliases are lost), so both are rebuilt from plain options.
        self._client = _s3_client(**self._options)
        self._transfer = TransferConfig(**self._transfer_options)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={_redact(self._client.meta.endpoint_url)!r})"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_transfer")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._connect()

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _folder(self, prefix: str) -> str:
        parts = [p for p in (self.prefix, _check_prefix(prefix)) if p]
        return "/".join(parts) + "/" if parts else ""

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer)

    def get_bytes(self, key: str) -> bytes:
        # One GET: concepts and manifests are kilobytes; get_file is for large blobs.
        with _missing_as_not_found(f"{self.uri}: no object {key!r}"):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if _is_missing(e):
                return False
            raise
        return True

    def list_prefix(self, prefix: str = "") -> list[str]:
        folder = self._folder(prefix)
        root = len(self.prefix) + 1 if self.prefix else 0
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
        return sorted(obj["Key"][root:] for page in pages for obj in page.get("Contents", ()))

    def delete_prefix(self, prefix: str) -> int:
        if not _check_prefix(prefix):
            raise ValueError(f"refusing to delete the whole store {self.uri}: give a non-empty prefix")
        keys = self.list_prefix(prefix)
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects call takes
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            errors = self._client.delete_objects(Bucket=self.bucket,
                                                 Delete={"Objects": batch, "Quiet": True}).get("Errors")
            if errors:
                raise OSError(f"{self.uri}: could not delete {len(errors)} objects, first {errors[0]}")
        return len(keys)

    def delete_key(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            self._client.upload_fileobj(src, self.bucket, self._key(key), Config=self._transfer)

    def get_file(self, key: str, path: str | os.PathLike) -> Path:
        full = self._key(key)
        with _missing_as_not_found(f"{self.uri}: no object {key!r}"):
            return atomic_write(Path(path), lambda f: self._client.download_fileobj(
                self.bucket, full, f, Config=self._transfer))


def _s3_client(endpoint_url: str | None, region_name: str | None, addressing_style: str | None,
               retry_mode: str, max_attempts: int):
    """An S3 client with botocore's retries; credentials and (unless given) endpoint from the AWS chain."""
    config = Config(retries={"mode": retry_mode, "max_attempts": max_attempts},
                    s3={"addressing_style": addressing_style} if addressing_style else None)
    # A session per client: boto3's default session is not safe to share across threads.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config)


@contextmanager
def _missing_as_not_found(message: str) -> Iterator[None]:
    """Turn S3's 'no such key' answers (404, NoSuchKey) into ObjectNotFound(message)."""
    try:
        yield
    except ClientError as e:
        if _is_missing(e):
            raise ObjectNotFound(message) from None
        raise


def _is_missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in _MISSING_CODES


# -- opening a store by URI -------------------------------------------------------------


def open_store(uri: str, **s3_options: Any) -> ArtifactStore:
    """Open `file:///abs/path`, a plain local path, or `s3://bucket/prefix`.

    `s3_options` go to `S3Store` (endpoint_url, region_name, addressing_style,
    retry_mode, max_attempts, multipart_threshold, multipart_chunksize,
    max_concurrency) and are refused for a local store.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"store uri={uri!r} is empty: use file:///path, a local path or s3://bucket/prefix")
    parts = urlsplit(uri)
    if not parts.scheme:
        return _local_store(uri, s3_options)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"store uri={_redact(uri)!r} may not carry credentials, a query or a fragment")
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(f"store uri={uri!r} is not a local absolute path: use file:///absolute/path")
        return _local_store(path, s3_options)
    if parts.scheme == "s3":
        return S3Store(parts.netloc, parts.path.strip("/"), **s3_options)
    raise ValueError(f"store uri={_redact(uri)!r}: unknown scheme {parts.scheme!r}; "
                     "use file:///path, a local path or s3://bucket/prefix")


def _local_store(path: str, s3_options: dict) -> FileStore:
    if s3_options:
        raise ValueError(f"S3 options {sorted(s3_options)} given for the local store {path!r}")
    return FileStore(path)


def _redact(url: str | None) -> str | None:
    """`url` with any user:password@ in its host part replaced by ***@ (for messages and logs)."""
    parts = urlsplit(url or "")
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
