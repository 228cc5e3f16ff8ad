"""The S3 backend of the artifact store: AWS or any S3-compatible server, through boto3.

Kept apart from `cluster.store` so that a local (`file://`) store never
imports boto3: `open_store("s3://...")` imports this module on first use. It
depends on the interface (`cluster.store_base`), not on `cluster.store`.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

from cluster.store_base import MiB, ArtifactStore, ObjectNotFound, check_key, check_prefix, redact
from yollava.artifacts import atomic_write

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RETRY_MODES = ("standard", "adaptive")
_MISSING_CODES = ("404", "NoSuchKey", "NotFound")
log = logging.getLogger(__name__)
# What this backend raises when S3 cannot be reached or refuses access (no credentials, a bad
# endpoint, a denied request...): never a missing object, which is ObjectNotFound.
ACCESS_ERRORS: tuple[type[Exception], ...] = (BotoCoreError, ClientError)


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
        self.bucket, self.prefix = bucket, check_prefix(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._options = dict(endpoint_url=endpoint_url, region_name=region_name,
                             addressing_style=addressing_style, retry_mode=retry_mode, max_attempts=max_attempts)
        self._transfer_options = dict(multipart_threshold=multipart_threshold,
                                      multipart_chunksize=multipart_chunksize, max_concurrency=max_concurrency)
        self._conditional_writes = True
        self._connect()  # a bad endpoint or region fails here, not at a write

    def _connect(self) -> None:
        # Neither the client nor TransferConfig survives pickling (TransferConfig's
        # attribute aliases are lost), so both are rebuilt from plain options.
        self._client = _s3_client(**self._options)
        self._transfer = TransferConfig(**self._transfer_options)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={redact(self._client.meta.endpoint_url)!r})"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_transfer")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._connect()

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _folder(self, prefix: str) -> str:
        parts = [p for p in (self.prefix, check_prefix(prefix)) if p]
        return "/".join(parts) + "/" if parts else ""

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # S3 (since 2024-08), MinIO, R2: PutObject with If-None-Match: * answers 412 when the key exists.
        # A server without conditional writes (501) gets a check, then a write: not atomic there.
        if not self._conditional_writes:
            if self.exists(key):
                return False
            self.put_bytes(key, data)
            return True
        try:
            self._put_if_none_match(self._key(key), data)
        except ClientError as e:
            code, status = _error_code(e), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return False
            if code == "NotImplemented" or status == 501:
                log.warning("%s does not support conditional writes (If-None-Match); "
                            "falling back to check-then-write", redact(self._client.meta.endpoint_url))
                self._conditional_writes = False
                return self.put_if_absent(key, data)
            raise
        return True

    @retry(retry=retry_if_exception(lambda e: isinstance(e, ClientError)
                                    and _error_code(e) == "ConditionalRequestConflict"),
           wait=wait_random_exponential(multiplier=0.05, max=2), stop=stop_after_attempt(8), reraise=True)
    def _put_if_none_match(self, full_key: str, data: bytes) -> None:
        # 409 ConditionalRequestConflict: another conditional write of this key is in flight; S3 says retry.
        self._client.put_object(Bucket=self.bucket, Key=full_key, Body=data, IfNoneMatch="*")

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
        if not check_prefix(prefix):
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


def _error_code(error: ClientError) -> str | None:
    return error.response.get("Error", {}).get("Code")


def _is_missing(error: ClientError) -> bool:
    return _error_code(error) in _MISSING_CODES
