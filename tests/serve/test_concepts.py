"""The concept cache and sharing rules, on a local store (no Ray)."""

import asyncio
import json
import threading
import time

import pytest

from cluster.store import ConceptNotFound, open_store
from serve.concepts import ConceptBroken, ConceptCache, ConceptResolver, Sharing, split_ref
from tests.serve.conftest import save_concept, tamper
from yollava.artifacts import ArtifactError


class CountingStore:
    """A store proxy counting concept reads, optionally slow, to observe single flight."""

    def __init__(self, store, delay=0.0):
        self.store, self.delay = store, delay
        self.gets = 0
        self._lock = threading.Lock()

    def get_concept(self, *a, **kw):
        with self._lock:
            self.gets += 1
        time.sleep(self.delay)
        return self.store.get_concept(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.store, name)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def local(tmp_path):
    return open_store((tmp_path / "store").as_uri())


def run(coro):
    return asyncio.run(coro)


def test_first_uses_load_once(local, tiny):
    save_concept(local, tiny, "alice", "bo", 1)
    store = CountingStore(local, delay=0.2)
    cache = ConceptCache(store, tiny.fingerprint, revalidate_s=60)

    async def go():
        return await asyncio.gather(*(cache.get("alice", "bo") for _ in range(10)))

    rows = run(go())
    assert store.gets == 1 and all(r is rows[0] for r in rows)
    assert cache.stats.loads == 1


def test_lru_by_bytes(local, tiny):
    for i in range(4):
        save_concept(local, tiny, "alice", f"c{i}", i, k=4)
    one = 2 * 5 * tiny.hidden_size * 4  # embed + head, (k+1, d) float32
    cache = ConceptCache(local, tiny.fingerprint, max_bytes=3 * one, revalidate_s=60)

    async def go():
        for name in ("c0", "c1", "c2"):
            await cache.get("alice", name)
        await cache.get("alice", "c0")  # c0 is now the most recent
        await cache.get("alice", "c3")  # evicts c1, the least recent

    run(go())
    assert cache.nbytes == 3 * one and len(cache) == 3
    assert [k[1] for k in cache._lru] == ["c2", "c0", "c3"]
    assert cache.stats.evictions == 1


def test_new_version_and_deletion_after_revalidate_s(local, tiny):
    clock = Clock()
    save_concept(local, tiny, "alice", "bo", 1)
    cache = ConceptCache(local, tiny.fingerprint, revalidate_s=5, clock=clock)
    v1 = run(cache.get("alice", "bo"))
    save_concept(local, tiny, "alice", "bo", 2)
    assert run(cache.get("alice", "bo")) is v1  # still fresh
    clock.t = 6
    v2 = run(cache.get("alice", "bo"))
    assert v2 is not v1 and not (v2.embed == v1.embed).all()
    clock.t = 12
    assert run(cache.get("alice", "bo")) is v2 and cache.stats.revalidations == 1  # same version: no load
    local.delete_concept("alice", "bo")
    clock.t = 18
    assert run(cache.get("alice", "bo")) is None and ("alice", "bo") not in cache
    assert run(cache.get("alice", "nope")) is None


def test_other_base_model_is_refused(local, tiny):
    save_concept(local, tiny, "alice", "bo", 1)
    cache = ConceptCache(local, "sha256:another-model", revalidate_s=0)
    with pytest.raises(ValueError, match="fingerprint|base"):
        run(cache.get("alice", "bo"))


def test_resolution_by_owner_and_shares(local, tiny):
    for seed, (owner, name) in enumerate((("alice", "bo"), ("bob", "bo"), ("carol", "mug"))):
        save_concept(local, tiny, owner, name, seed)
    sharing = Sharing(local)
    resolver = ConceptResolver(ConceptCache(local, tiny.fingerprint, revalidate_s=0), sharing, revalidate_s=0)

    def ids(tenant, refs):
        return [c.tokens.identifier for c in run(resolver.resolve(tenant, refs))]

    assert split_ref("bo", "alice") == ("alice", "bo") and split_ref("carol/mug", "bob") == ("carol", "mug")
    assert ids("alice", ["bo", "mug", "carol/mug", "bob/bo", "bo_1", "image"]) == ["<bo>"]
    assert ids("bob", ["bo", "alice/bo", "bob/bo"]) == ["<bo>", "<bob/bo>"]
    assert sharing.share("carol", "mug", "bob") and not sharing.share("carol", "mug", "bob")
    assert ids("bob", ["carol/mug", "bo"]) == ["<carol/mug>", "<bo>"]
    assert ids("alice", ["carol/mug"]) == []
    assert sharing.shared_with("bob") == [("carol", "mug")] and sharing.shared_with("alice") == []
    assert sharing.unshare("carol", "mug", "bob") and not sharing.unshare("carol", "mug", "bob")
    assert ids("bob", ["carol/mug"]) == [] and sharing.shared_with("bob") == []
    # the rows of a shared concept are its owner's, shown under the name the caller typed
    sharing.share("alice", "bo", "bob")
    got = run(resolver.resolve("bob", ["alice/bo"]))[0]
    assert got.tokens.identifier == "<alice/bo>" and got.tokens.latents[0] == "<bo_1>"
    assert (got.embed == local.get_concept("alice", "bo").rows.embed).all()


def test_a_broken_artifact_is_named_as_the_caller_typed_it(local, tiny):
    save_concept(local, tiny, "alice", "bo", 1)
    save_concept(local, tiny, "alice", "ok", 2)
    tamper(local, "alice", "bo")
    sharing = Sharing(local)
    sharing.share("alice", "bo", "bob")
    resolver = ConceptResolver(ConceptCache(local, tiny.fingerprint, revalidate_s=0), sharing, revalidate_s=0)
    for tenant, ref in (("alice", "bo"), ("bob", "alice/bo")):
        with pytest.raises(ConceptBroken) as info:
            run(resolver.resolve(tenant, ["ok", ref]))
        assert info.value.ref == ref and str(info.value) == f"concept <{ref}> failed its integrity check on load"
        assert isinstance(info.value.__cause__, ArtifactError)
    assert [c.tokens.identifier for c in run(resolver.resolve("alice", ["ok"]))] == ["<ok>"]


# -- grants under concurrency, deletion and retraining (issue 15, finding 2) ----------------------

from tests.cluster.conftest import s3_bucket, s3_client, store  # noqa: E402,F401 (fixtures: file:// and s3://)


def usable(store, tenant, ref):
    """Whether `tenant` resolves `ref` right now (no cache in the way)."""
    resolver = ConceptResolver(ConceptCache(store, None, revalidate_s=0), Sharing(store), revalidate_s=0)
    return bool(run(resolver.resolve(tenant, [ref])))


def test_share_racing_unshare_never_undoes_the_unshare(store):
    """share(bob) and unshare(carol) at once, many rounds: carol is out, bob is in, every time."""
    from bench.reliability import race_shares

    rounds = 10 if store.uri.startswith("file:") else 4  # S3 rounds cost more (python -m bench.reliability: 50)
    result = race_shares(store, rounds=rounds)
    assert result["rounds"] == rounds
    assert result["violations"] == []


def test_a_share_racing_the_deletion_does_not_share_the_retrained_concept(store):
    from bench.reliability import race_delete

    rounds = 6 if store.uri.startswith("file:") else 3
    result = race_delete(store, rounds=rounds)
    assert result["rounds"] == rounds
    assert result["violations"] == []


def test_grants_die_with_the_concept_however_it_was_deleted(local, tiny):
    """Deleted outside the chat API (cluster.ops concepts rm), then trained again under the same
    name: the grants of the old concept do not apply to the new one."""
    save_concept(local, tiny, "alice", "bo", 1)
    Sharing(local).share("alice", "bo", "bob")
    assert usable(local, "bob", "alice/bo")
    local.delete_concept("alice", "bo")
    assert not usable(local, "bob", "alice/bo")
    save_concept(local, tiny, "alice", "bo", 2)
    assert not usable(local, "bob", "alice/bo")
    assert Sharing(local).grantees("alice", "bo") == []
    assert Sharing(local).share("alice", "bo", "bob")  # shared again on purpose: it applies
    assert usable(local, "bob", "alice/bo")


def test_a_share_of_a_concept_that_does_not_exist_is_refused(local):
    with pytest.raises(ConceptNotFound, match="alice/ghost"):
        Sharing(local).share("alice", "ghost", "bob")
    assert local.list_prefix("shares") == []


def test_unshare_is_in_force_for_every_replica_within_revalidate_s(local, tiny):
    save_concept(local, tiny, "alice", "bo", 1)
    Sharing(local).share("alice", "bo", "bob")
    clock = Clock()
    replicas = [ConceptResolver(ConceptCache(local, tiny.fingerprint, revalidate_s=5, clock=clock), Sharing(local),
                                revalidate_s=5, clock=clock) for _ in range(2)]
    assert all(run(r.resolve("bob", ["alice/bo"])) for r in replicas)
    assert Sharing(local).unshare("alice", "bo", "bob")
    clock.t = 5.0
    assert not any(run(r.resolve("bob", ["alice/bo"])) for r in replicas)


def test_legacy_share_documents_are_migrated_by_a_command(local, tiny, capsys, caplog):
    """Stores written before one-object-per-grant hold shares/<owner>/<name>.json: until migrated it
    grants nothing (and says so in the log); `cluster.ops migrate` turns it into grants."""
    from cluster import ops

    save_concept(local, tiny, "alice", "bo", 1)
    local.put_json("shares/alice/bo.json", {"tenants": ["bob", "carol"]})
    local.put_json("shares/alice/gone.json", {"tenants": ["bob"]})  # its concept no longer exists
    local.put_bytes("shared-with/bob/alice/bo", b"")
    with caplog.at_level("WARNING"):
        assert not usable(local, "bob", "alice/bo")
    assert "cluster.ops migrate" in caplog.text
    assert ops.main(["migrate", "--store", local.uri]) == 0
    assert json.loads(capsys.readouterr().out) == {"grants_migrated": 2, "legacy_documents": 2,
                                                   "dropped_for_missing_concepts": 1}
    assert usable(local, "bob", "alice/bo") and usable(local, "carol", "alice/bo")
    assert Sharing(local).grantees("alice", "bo") == ["bob", "carol"]
    assert Sharing(local).shared_with("carol") == [("alice", "bo")]
    assert not local.exists("shares/alice/bo.json") and not local.exists("shares/alice/gone.json")
    assert ops.main(["migrate", "--store", local.uri]) == 0  # idempotent
    assert json.loads(capsys.readouterr().out)["legacy_documents"] == 0
