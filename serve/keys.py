"""API keys: a JSON file mapping sha256(key) -> tenant. Keys are shown once and never stored.

    python -m serve.keys create alice --keys keys.json   # prints a new key for tenant alice
    python -m serve.keys list --keys keys.json           # key ids and tenants, no secrets
    python -m serve.keys revoke KEY_ID --keys keys.json

Keys are 256-bit random strings, so one round of sha256 is enough (there is
nothing to brute-force that a slow hash would protect). The file may be a
mounted secret; `KeyRing` rereads it when it changes, so new keys work
without a restart. A file that anyone but its owner may write (group- or
world-writable, or owned by another user than this one or root) is refused:
whoever can write it can mint keys. A reread that fails (a file caught
half-written, made writable by others) keeps the last good keys and says so
once in the log; only the first read fails the service. `create` and
`revoke` hold a lock file (`.<name>.lock` beside it) around their
read-modify-write, so concurrent runs lose no key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from yollava.tokens import check_name

KEY_PREFIX = "yk-"
FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    tenant: str
    sha256: str
    created: str


def check_keys_file_access(path: str | os.PathLike) -> None:
    """PermissionError naming the file unless only its owner (this user or root) may write it."""
    st = os.stat(path)  # follows links: a mounted Secret's file is a link into ..data/
    mode = st.st_mode & 0o777
    if mode & 0o022:
        raise PermissionError(f"keys file {str(path)!r} is writable by others (mode {oct(mode)}): anyone who can "
                              "write it can mint keys; refusing it (chmod go-w)")
    if st.st_uid not in (0, os.getuid()):
        raise PermissionError(f"keys file {str(path)!r} is owned by uid {st.st_uid}, neither this user "
                              f"({os.getuid()}) nor root: refusing it")


def read_keys_file(path: str | os.PathLike) -> list[KeyEntry]:
    """Parse and validate a keys file; a missing file holds no keys; one others may write is refused."""
    path = Path(path)
    if not path.exists():
        return []
    check_keys_file_access(path)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"keys file {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION or not isinstance(doc.get("keys"), list):
        raise ValueError(f"keys file {str(path)!r} is not a format_version {FORMAT_VERSION} keys file")
    entries = []
    for i, e in enumerate(doc["keys"]):
        try:
            entries.append(KeyEntry(str(e["key_id"]), check_name(e["tenant"], "tenant"),
                                    str(e["sha256"]), str(e.get("created", ""))))
        except (KeyError, TypeError) as err:
            raise ValueError(f"keys file {str(path)!r}: entry {i} is malformed ({err})") from None
    return entries


def write_keys_file(path: str | os.PathLike, entries: list[KeyEntry]) -> None:
    """Write atomically, readable by the owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format_version": FORMAT_VERSION,
           "keys": [e.__dict__ for e in entries]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _lock(path: str | os.PathLike) -> FileLock:
    """The lock around a keys file's read-modify-write (a file beside it; works across processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.parent / f".{path.name}.lock"), timeout=60)


def create_key(path: str | os.PathLike, tenant: str) -> str:
    """Add a new key for `tenant` to the file; return the key (the only time it exists in clear)."""
    check_name(tenant, "tenant")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with _lock(path):
        entries = read_keys_file(path)
        entries.append(KeyEntry("key_" + secrets.token_hex(6), tenant, hash_key(key),
                                datetime.now(timezone.utc).isoformat(timespec="seconds")))
        write_keys_file(path, entries)
    return key


def revoke_key(path: str | os.PathLike, key_id: str) -> bool:
    """Remove a key by its id; False if there was none."""
    with _lock(path):
        entries = read_keys_file(path)
        kept = [e for e in entries if e.key_id != key_id]
        if len(kept) != len(entries):
            write_keys_file(path, kept)
    return len(kept) != len(entries)


class KeyRing:
    """Bearer key -> tenant, from a keys file reread when it changes (checked at most every `recheck_s`)."""

    def __init__(self, path: str | os.PathLike, recheck_s: float = 1.0):
        self.path = Path(path)
        self.recheck_s = recheck_s
        self._by_hash: dict[str, str] = {}
        self._stamp: tuple | None = None
        self._refused: tuple | None = None  # the stamp of the last file refused (logged once)
        self._checked = 0.0
        self._lock = threading.Lock()
        self._by_hash = self._read(self._file_stamp())  # the first read fails loudly: there are no last good keys

    def _file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # a mode or owner change is a change too (ctime)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode, st.st_uid)

    def _read(self, stamp: tuple | None) -> dict[str, str]:
        keys = {e.sha256: e.tenant for e in read_keys_file(self.path)}
        self._stamp = stamp
        return keys

    def _reload(self) -> None:
        stamp = self._file_stamp()
        if stamp != self._stamp and stamp != self._refused:
            try:
                self._by_hash = self._read(stamp)
            except (ValueError, OSError) as e:  # half-written, unparsable, writable by others, unreadable
                self._refused = stamp
                log.warning("keys file %s could not be used, keeping the last good keys (%d): %s",
                            self.path, len(self._by_hash), e)
        self._checked = time.monotonic()

    def tenant(self, key: str | None) -> str | None:
        """The tenant of `key`, or None for a missing, malformed or unknown key."""
        if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        with self._lock:
            if time.monotonic() - self._checked > self.recheck_s:
                self._reload()
            # A lookup by sha256 of the key: its timing depends on the hash, which a caller cannot
            # steer towards a stored one, so no constant-time compare is needed.
            return self._by_hash.get(hash_key(key))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.keys", description="Manage the chat API's keys.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a key for TENANT; prints it once")
    c.add_argument("tenant")
    c.add_argument("--keys", required=True, help="the keys file (created if missing)")
    ls = sub.add_parser("list", help="list key ids and tenants (no secrets)")
    ls.add_argument("--keys", required=True)
    rv = sub.add_parser("revoke", help="remove a key by its id")
    rv.add_argument("key_id")
    rv.add_argument("--keys", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "create":
            print(create_key(args.keys, args.tenant))
        elif args.cmd == "list":
            for e in read_keys_file(args.keys):
                print(f"{e.key_id}\t{e.tenant}\t{e.created}")
        else:
            if not revoke_key(args.keys, args.key_id):
                print(f"no key with id {args.key_id!r} in {args.keys}", file=sys.stderr)
                return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
