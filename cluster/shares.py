"""Grants: who may use a concept besides its owner. One object per grant, tied to the concept's life.

Layout under the store root, next to `concepts/`::

    shares/<owner>/<name>/<tenant>.json        {"incarnation": ID, "granted": TIME}: the authority
    shared-with/<tenant>/<owner>/<name>        an index for listing only, checked against the authority

A share writes one object and an unshare deletes one, so concurrent edits of
one concept's grants never undo each other (there is no list to read, modify
and write back). A grant holds the concept's *incarnation*
(`ArtifactStore.incarnation`): deleting the concept deletes the incarnation,
so grants of a deleted concept never apply to one trained later under the
same name, whatever deleted it and whatever raced the deletion.

Stores from before one-object-per-grant hold `shares/<owner>/<name>.json`
(`{"tenants": [...]}`); those grant nothing (a warning says so) until
`python -m cluster.ops migrate --store URI` turns them into grants.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from cluster.store_base import ArtifactStore, ConceptNotFound, ObjectNotFound
from yollava.tokens import check_name

SHARES = "shares"
INBOX = "shared-with"
log = logging.getLogger(__name__)


def _grant_key(owner: str, name: str, tenant: str) -> str:
    return f"{SHARES}/{check_name(owner, 'owner')}/{check_name(name, 'name')}/{check_name(tenant, 'tenant')}.json"


def _inbox_key(owner: str, name: str, tenant: str) -> str:
    return f"{INBOX}/{check_name(tenant, 'tenant')}/{check_name(owner, 'owner')}/{check_name(name, 'name')}"


def _legacy_key(owner: str, name: str) -> str:
    return f"{SHARES}/{owner}/{name}.json"


class Grants:
    """Sharing rules over a store (blocking calls)."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self._legacy_checked = False

    def allowed(self, owner: str, name: str, tenant: str) -> bool:
        """Whether `tenant` holds a grant of this life of owner/name (the owner always may)."""
        if tenant == owner:
            return True
        self._warn_legacy()
        try:
            grant = self.store.get_json(_grant_key(owner, name, tenant))
        except ObjectNotFound:
            return False
        current = self.store.incarnation(owner, name)
        return current is not None and grant.get("incarnation") == current

    def grantees(self, owner: str, name: str) -> list[str]:
        """Tenants holding a grant of this life of the concept, sorted."""
        self._warn_legacy()
        current = self.store.incarnation(owner, name)
        if current is None:
            return []
        out = []
        for key in self.store.list_prefix(f"{SHARES}/{check_name(owner, 'owner')}/{check_name(name, 'name')}"):
            try:
                if self.store.get_json(key).get("incarnation") == current:
                    out.append(key.rsplit("/", 1)[1].removesuffix(".json"))
            except ObjectNotFound:  # unshared meanwhile
                continue
        return sorted(out)

    def share(self, owner: str, name: str, tenant: str) -> bool:
        """Grant `tenant` this life of owner/name; False if it held a grant already.

        ConceptNotFound if the concept has no version (or was deleted while this ran:
        the grant is then taken back, so a share racing a deletion never outlives it).
        """
        if tenant == owner:
            raise ValueError(f"tenant={tenant!r} owns {owner}/{name}: an owner needs no grant")
        key = _grant_key(owner, name, tenant)
        incarnation = self.store.incarnation(owner, name, create=True)
        try:
            had = self.store.get_json(key).get("incarnation") == incarnation
        except ObjectNotFound:
            had = False
        self.store.put_bytes(_inbox_key(owner, name, tenant), b"")  # the index first, the authority last
        grant = {"incarnation": incarnation, "granted": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.store.put_json(key, grant)
        if self.store.incarnation(owner, name) != incarnation or not self.store.versions(owner, name):
            self.store.delete_key(key)  # deleted while we granted: take it back
            raise ConceptNotFound(owner, name)
        return not had

    def unshare(self, owner: str, name: str, tenant: str) -> bool:
        """Take `tenant`'s grant back; False if it held none. The authority first, the index last."""
        key = _grant_key(owner, name, tenant)
        existed = self.store.exists(key)
        self.store.delete_key(key)
        self.store.delete_key(_inbox_key(owner, name, tenant))
        return existed

    def drop(self, owner: str, name: str) -> int:
        """Take back every grant of a concept (before deleting it); returns how many there were."""
        prefix = f"{SHARES}/{check_name(owner, 'owner')}/{check_name(name, 'name')}"
        keys = self.store.list_prefix(prefix)
        for key in keys:
            self.store.delete_key(key)
            self.store.delete_key(_inbox_key(owner, name, key.rsplit("/", 1)[1].removesuffix(".json")))
        self.store.delete_key(_legacy_key(owner, name))
        return len(keys)

    def shared_with(self, tenant: str) -> list[tuple[str, str]]:
        """(owner, name) of concepts shared with `tenant`, checked against the authority."""
        out = []
        for key in self.store.list_prefix(f"{INBOX}/{check_name(tenant, 'tenant')}"):
            owner, name = key.split("/")[-2:]
            if self.allowed(owner, name, tenant):
                out.append((owner, name))
        return sorted(out)

    def _warn_legacy(self) -> None:
        if self._legacy_checked:
            return
        self._legacy_checked = True
        legacy = legacy_documents(self.store)
        if legacy:
            log.warning("%s holds %d share document(s) of the old layout (first: %s); they grant nothing until "
                        "`python -m cluster.ops migrate --store %s` turns them into grants",
                        self.store.uri, len(legacy), legacy[0], self.store.uri)


def legacy_documents(store: ArtifactStore) -> list[str]:
    """Keys of `shares/<owner>/<name>.json` documents (the layout before one object per grant)."""
    return [k for k in store.list_prefix(SHARES) if k.count("/") == 2 and k.endswith(".json")]


def migrate_legacy(store: ArtifactStore) -> dict:
    """Turn old `shares/<owner>/<name>.json` documents into one grant per tenant; idempotent.

    A document whose concept no longer exists grants nothing: it is removed
    with its index entries.
    """
    grants = Grants(store)
    grants._legacy_checked = True
    docs = legacy_documents(store)
    migrated = dropped = 0
    for key in docs:
        owner, file = key.split("/")[1:]
        name = file.removesuffix(".json")
        tenants = [t for t in store.get_json(key).get("tenants", []) if isinstance(t, str) and t != owner]
        if store.versions(owner, name):
            for tenant in tenants:
                try:
                    grants.share(owner, name, tenant)
                    migrated += 1
                except ConceptNotFound:  # deleted meanwhile
                    break
        else:
            dropped += 1
            for tenant in tenants:
                store.delete_key(_inbox_key(owner, name, tenant))
        store.delete_key(key)
    return {"legacy_documents": len(docs), "grants_migrated": migrated, "dropped_for_missing_concepts": dropped}

