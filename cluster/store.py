"""The artifact store: concepts and job files under one root, on a local disk or on S3.

`open_store(uri)` opens a store: `FileStore` (here) for `file:///path` or a
local path, `S3Store` (`cluster.store_s3`, which imports boto3) for
`s3://bucket/prefix`, imported on the first s3:// store so that a process that
only uses local stores never loads boto3. The interface every backend
implements, `ArtifactStore`, its errors and the concept layout are in
`cluster.store_base`, and importable from here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from cluster.store_base import (CONCEPTS, MiB, ArtifactStore, ConceptExists, ConceptNotFound, ConceptRef,
                                ObjectNotFound, VersionConflict, check_key, check_prefix, redact)
from yollava.artifacts import atomic_write

if TYPE_CHECKING:
    from cluster.store_s3 import S3Store

__all__ = ["CONCEPTS", "MiB", "ArtifactStore", "ConceptExists", "ConceptNotFound", "ConceptRef", "FileStore",
           "ObjectNotFound", "VersionConflict", "access_errors", "check_key", "open_store"]
_S3_MODULE = "cluster.store_s3"


# -- local files ------------------------------------------------------------------------


class FileStore(ArtifactStore):
    """A folder on a local (or shared) file system; every write is temp file + fsync + rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _folder(self, prefix: str) -> Path:
        prefix = check_prefix(prefix)
        return self._path(prefix) if prefix else self.root

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), lambda f: f.write(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # Written in full to a temp file, then link()ed under its name: link fails if the name exists,
        # atomically, and a reader never sees a partial object.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

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
        if not check_prefix(prefix):
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
        raise ValueError(f"store uri={redact(uri)!r} may not carry credentials, a query or a fragment")
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(f"store uri={uri!r} is not a local absolute path: use file:///absolute/path")
        return _local_store(path, s3_options)
    if parts.scheme == "s3":
        return _s3_store(parts.netloc, parts.path.strip("/"), s3_options)
    raise ValueError(f"store uri={redact(uri)!r}: unknown scheme {parts.scheme!r}; "
                     "use file:///path, a local path or s3://bucket/prefix")


def _s3_store(bucket: str, prefix: str, s3_options: dict) -> S3Store:
    from cluster.store_s3 import S3Store  # boto3 is imported here, on the first s3:// store

    return S3Store(bucket, prefix, **s3_options)


def access_errors() -> tuple[type[Exception], ...]:
    """What the loaded backends raise when a store cannot be reached or refuses access.

    (No credentials, a bad endpoint, a denied request: never a missing object,
    which is ObjectNotFound.) For an `except` clause. Only a backend already
    imported can have raised anything, so none is imported here: without an
    s3:// store in this process, the tuple is empty.
    """
    s3 = sys.modules.get(_S3_MODULE)
    return s3.ACCESS_ERRORS if s3 is not None else ()


def _local_store(path: str, s3_options: dict) -> FileStore:
    if s3_options:
        raise ValueError(f"S3 options {sorted(s3_options)} given for the local store {path!r}")
    return FileStore(path)
