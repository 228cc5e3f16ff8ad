"""Who may ask for what: each owner's concepts train only on photos under that owner's prefixes.

A request names owners and photo sources; the driver can read far more than
any one owner's photos (every owner's folder, every bucket its credentials
open). The owner policy says, per owner, under which prefixes its photos
live, and which prefixes the shared negative pool may come from::

    # policy/owners.yaml in the store (or --policy FILE|s3://..., or $YOLLAVA_POLICY)
    owners:
      alice: [s3://photos-bucket/alice/, /data/photos/alice/]
      bob:   [s3://photos-bucket/bob/]
    negatives: [s3://photos-bucket/pool/]

The driver checks every subject's sources, and then every photo a folder or
prefix expands to (symbolic links resolved), before it reads a photo's bytes
and before any training: an owner without an entry, a photo outside its
owner's prefixes, or a negative outside the pool's prefixes refuses the
whole request (exit 2). So a request cannot train (and publish a version of)
alice's concept on anyone's photos but alice's, nor anyone's concept on
alice's photos.

Where the policy comes from, first found: `--policy`, `$YOLLAVA_POLICY`,
the store's `policy/owners.yaml`. Without any, requests are not restricted
(a warning says so): one-machine use and the demo. The policy guards the
*request* (data a front end or a user wrote); whoever can submit a Ray job
runs code with the jobs' credentials and is trusted (docs/adr-003).
"""

from __future__ import annotations

import logging
import os
import posixpath
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.store_base import ArtifactStore, ObjectNotFound
from yollava.tokens import check_name

POLICY_KEY = "policy/owners.yaml"
POLICY_ENV = "YOLLAVA_POLICY"
log = logging.getLogger(__name__)


class PolicyError(Exception):
    """A request the owner policy refuses, or a policy that cannot be read; the message says which and why.

    Not a ValueError: it is no photo's problem, and refuses the whole request.
    """


def _check_prefix(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"prefix {value!r} must be a non-empty string")
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if not bucket or _has_dot_segments(key):
            raise ValueError(f"prefix {value!r} must be s3://bucket/prefix/ without '.' or '..' parts")
        return value if value.endswith("/") else value + "/"
    if "://" in value or not value.startswith("/"):
        raise ValueError(f"prefix {value!r} must be an absolute local path or s3://bucket/prefix/")
    return posixpath.normpath(value).rstrip("/") + "/"


def _has_dot_segments(key: str) -> bool:
    return any(part in (".", "..") for part in key.split("/")) or "//" in key


class OwnerPolicy(BaseModel):
    """owner -> allowed photo prefixes, and the negative pool's allowed prefixes."""

    model_config = ConfigDict(extra="forbid")

    owners: dict[str, list[str]] = Field(description="owner -> prefixes its subjects' photos may come from")
    negatives: list[str] = Field(default_factory=list, description="prefixes the negative pool may come from")

    @field_validator("owners")
    @classmethod
    def _owners(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for owner, prefixes in value.items():
            try:
                out[check_name(owner, "owner")] = [_check_prefix(p) for p in prefixes]
            except ValueError as e:
                raise ValueError(f"owners.{owner}: {e}") from None
        return out

    @field_validator("negatives")
    @classmethod
    def _negatives(cls, value: list[str]) -> list[str]:
        return [_check_prefix(p) for p in value]

    def allows(self, owner: str, uri: str) -> bool:
        return _under(uri, self.owners.get(owner, []))

    def allows_negative(self, uri: str) -> bool:
        return _under(uri, self.negatives)

    def check(self, owner: str, uri: str, what: str) -> None:
        """PolicyError unless `uri` (a photo, folder or prefix of `what`) is under one of `owner`'s prefixes."""
        if owner not in self.owners:
            raise PolicyError(f"policy: {what}: owner={owner!r} has no entry in the owner policy")
        if not self.allows(owner, uri):
            raise PolicyError(f"policy: {what}: {_shown(uri)!r} is outside owner={owner!r}'s photo prefixes "
                              f"{self.owners[owner]}")

    def check_negative(self, uri: str) -> None:
        if not self.allows_negative(uri):
            raise PolicyError(f"policy: negatives: {_shown(uri)!r} is outside the pool's prefixes {self.negatives}")

    def checker(self, owner: str, what: str) -> Callable[[str], None]:
        return lambda uri: self.check(owner, uri, what)

    def check_request(self, subjects: list[tuple[str, str, list[str]]], negatives: list[str]) -> None:
        """Every subject's owner and sources, and the pool's sources, before any photo is read."""
        for owner, name, sources in subjects:
            for source in sources:
                self.check(owner, source, f"subject {owner}/{name}")
        for source in negatives:
            self.check_negative(source)


def _resolved(uri: str) -> str | None:
    """The path a local uri really names (symbolic links and '..' resolved); an s3 uri as is; None if unsafe."""
    if uri.startswith("s3://"):
        return None if _has_dot_segments(uri[5:].partition("/")[2]) else uri
    return os.path.realpath(uri)


def _shown(uri: str) -> str:
    resolved = _resolved(uri)
    return uri if resolved in (None, uri) else f"{uri} -> {resolved}"


def _under(uri: str, prefixes: list[str]) -> bool:
    path = _resolved(uri)
    if path is None:
        return False
    for prefix in prefixes:
        root = prefix if prefix.startswith("s3://") else os.path.realpath(prefix).rstrip("/") + "/"
        if path == root.rstrip("/") or path.startswith(root):
            return True
    return False


def parse_policy(raw: bytes, source: str) -> OwnerPolicy:
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise PolicyError(f"policy {source}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"policy {source}: the top level must be a mapping with `owners`")
    try:
        return OwnerPolicy.model_validate(doc)
    except ValidationError as e:
        where = "; ".join(f"field {'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                          for err in e.errors())
        raise PolicyError(f"policy {source}: {where}") from None


def load_policy(option: str | None, store: ArtifactStore) -> OwnerPolicy | None:
    """The owner policy: `option`, else $YOLLAVA_POLICY, else the store's policy/owners.yaml, else None."""
    source = option or os.environ.get(POLICY_ENV)
    if source:
        return parse_policy(_read(source), source)
    try:
        raw = store.get_bytes(POLICY_KEY)
    except ObjectNotFound:
        log.warning("no owner policy (--policy, $%s or %s/%s): any request may name any owner and any photo "
                    "this driver can read", POLICY_ENV, store.uri, POLICY_KEY)
        return None
    return parse_policy(raw, f"{store.uri}/{POLICY_KEY}")


def _read(source: str) -> bytes:
    if source.startswith("s3://"):
        from cluster.request import s3_endpoint
        from cluster.store_s3 import S3Store

        bucket, _, key = source[5:].partition("/")
        try:
            return S3Store(bucket, endpoint_url=s3_endpoint()).get_bytes(key)
        except ObjectNotFound:
            raise PolicyError(f"policy {source!r} does not exist") from None
    path = Path(source)
    if not path.is_file():
        raise PolicyError(f"policy file {source!r} does not exist")
    return path.read_bytes()
