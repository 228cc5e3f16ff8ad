"""Reliability figures: racing writers and grants, workers killed mid-job, S3 answering 503.

    python -m bench.reliability [--parts races kill s3] [--race-rounds 50] [--kill-runs 10]
                                [--fault-every 5] [--workdir DIR]

Every figure counts violations of an invariant, never a timing:

* races: R rounds of 3 writers putting versions of one concept at once, on a
  `file://` store and on S3 (moto on loopback), while a reader loads the latest
  version: two writers with one version, a version that fails its integrity
  check when read, a writer whose version holds another's tensors. Then R
  rounds of `share(bob)` racing `unshare(carol)` (carol must be out, bob in)
  and of a share racing the concept's deletion (after a retrain, the racing
  grantee must be out).
* kill: N jobs of 3 subjects on a local Ray, each with its Ray Train worker
  SIGKILLed from outside at a random moment: subjects lost (no loadable
  version), trained twice (more than one complete version), versions that do
  not load, and jobs that did not finish with every subject trained.
* s3: one job whose store is behind a proxy answering every N-th request 503:
  subjects lost, duplicates, unreadable versions.

Prints a table, then one JSON line. Moto's server is started in this process
unless `YOLLAVA_TEST_S3_ENDPOINT` names one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from PIL import Image

from bench.faults import FaultyS3Proxy, WorkerKiller, slowed
from cluster.store import ArtifactStore, ConceptNotFound, open_store
from yollava.artifacts import ArtifactError, ConceptArtifact
from yollava.concept_model import ConceptRows
from yollava.tokens import ConceptTokens

RECIPE = {"num_latent": 2, "epochs": 1, "hard_negatives": 0, "easy_negatives": 0, "positive_questions": 1,
          "attribute_questions": 1, "max_answer_tokens": 4, "near_duplicate": 1.0, "flip": False, "batch_size": 4}
SUBJECTS = (("alice", "bo"), ("alice", "mug"), ("bob", "bo"))
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def concept(owner: str, name: str, seed: int, k: int = 2, d: int = 16) -> ConceptArtifact:
    """A small concept with random rows (no backbone needed)."""
    g = torch.Generator().manual_seed(seed)
    rows = ConceptRows(ConceptTokens(name, k), torch.randn(k + 1, d, generator=g), torch.randn(k + 1, d, generator=g))
    return ConceptArtifact(owner, rows, "race", "sha256:race")


def handle(store: ArtifactStore, seed: int, max_delay_s: float = 0.004) -> ArtifactStore:
    """A separate handle on the same store (its own S3 client: the copy goes through the store's
    __getstate__/__setstate__, as a store sent to a Ray worker does), with a little latency on every call."""
    return slowed(copy.copy(store), seed, max_delay_s)


# -- racing writers ------------------------------------------------------------------------------------


def race_writers(store: ArtifactStore, rounds: int, writers: int = 3, seed: int = 0) -> dict:
    """`writers` handles put a version of one concept at once, a reader loads the latest meanwhile.

    Violations: a version returned to two writers, a version whose load fails
    (tensors of one writer under another's manifest), a writer's version that
    does not hold its own tensors, versions listed that no writer returned.
    """
    violations: list[str] = []
    reads = 0
    for r in range(rounds):
        name = f"race{r}"
        arts = [concept("alice", name, seed * 100_000 + r * 100 + w) for w in range(writers)]
        hands = [handle(store, seed * 100_000 + r * 100 + w) for w in range(writers)]
        reader = handle(store, seed * 100_000 + r * 100 + 99)
        start = threading.Barrier(writers + 1)
        done = threading.Event()

        def write(w: int) -> int:
            start.wait()
            return hands[w].put_concept(arts[w])

        def read() -> tuple[list[str], int]:
            start.wait()
            bad, n = [], 0
            while True:
                finished = done.is_set()
                try:
                    reader.get_concept("alice", name)
                    n += 1
                except ConceptNotFound:
                    pass
                except ArtifactError as e:
                    bad.append(f"round {r}: a reader loaded a broken version: {e}")
                if finished:
                    return bad, n

        with ThreadPoolExecutor(writers + 1) as pool:
            seen = pool.submit(read)
            futures = [pool.submit(write, w) for w in range(writers)]
            got = []
            for f in futures:
                try:
                    got.append(f.result())
                except (ArtifactError, ValueError, RuntimeError) as e:
                    got.append(None)
                    violations.append(f"round {r}: a writer failed: {type(e).__name__}: {e}")
            done.set()
            bad, n = seen.result()
        violations += bad
        reads += n
        if len({v for v in got if v is not None}) != len([v for v in got if v is not None]):
            violations.append(f"round {r}: writers got versions {got}: one version for two writers")
        for w, v in enumerate(got):
            if v is None:
                continue
            try:
                back = store.get_concept("alice", name, v)
            except (ArtifactError, ConceptNotFound) as e:
                violations.append(f"round {r}: writer {w}'s version {v} does not load: {e}")
                continue
            if not torch.equal(back.rows.embed, arts[w].rows.embed):
                violations.append(f"round {r}: writer {w}'s version {v} holds another writer's tensors")
        if sorted(store.versions("alice", name)) != sorted(v for v in got if v is not None):
            violations.append(f"round {r}: store lists versions {store.versions('alice', name)}, writers got {got}")
    return {"rounds": rounds, "writers": writers, "reads": reads, "violations": violations}


# -- racing grants ---------------------------------------------------------------------------------------


def _usable(store: ArtifactStore, tenant: str, owner: str, name: str) -> bool:
    """Whether `tenant` resolves <owner/name> now, through the chat's own resolver (no caching)."""
    import asyncio

    from serve.concepts import ConceptCache, ConceptResolver, Sharing

    resolver = ConceptResolver(ConceptCache(store, None, revalidate_s=0), Sharing(store), revalidate_s=0)
    return bool(asyncio.run(resolver.resolve(tenant, [f"{owner}/{name}"])))


def race_shares(store: ArtifactStore, rounds: int, seed: int = 0) -> dict:
    """share(bob) racing unshare(carol), on a concept shared with carol.

    Violations: carol can still use the concept after her unshare returned;
    bob cannot after his share returned; an unshare of a grant that existed
    said it changed nothing.
    """
    from serve.concepts import Sharing

    violations: list[str] = []
    for r in range(rounds):
        name = f"share{r}"
        store.put_concept(concept("alice", name, seed * 1000 + r))
        Sharing(store).share("alice", name, "carol")
        a, b = (Sharing(handle(store, seed * 1000 + r * 10 + i)) for i in (1, 2))
        start = threading.Barrier(2)

        def share_bob():
            start.wait()
            return a.share("alice", name, "bob")

        def unshare_carol():
            start.wait()
            return b.unshare("alice", name, "carol")

        with ThreadPoolExecutor(2) as pool:
            shared, unshared = pool.submit(share_bob), pool.submit(unshare_carol)
            shared, unshared = shared.result(), unshared.result()
        if not unshared:
            violations.append(f"round {r}: unshare(carol) of an existing grant said it changed nothing")
        if _usable(store, "carol", "alice", name):
            violations.append(f"round {r}: carol can use alice/{name} after unshare said {unshared}")
        if not _usable(store, "bob", "alice", name):
            violations.append(f"round {r}: bob cannot use alice/{name} after share said {shared}")
    return {"rounds": rounds, "violations": violations}


def race_delete(store: ArtifactStore, rounds: int, seed: int = 0) -> dict:
    """share(dave) racing the concept's deletion (the chat API's), then the name is trained again.

    Violations: bob (shared before the deletion) or dave can use the concept
    retrained under the same name.
    """
    from cluster.lifecycle import forget_concept
    from serve.concepts import Sharing

    violations: list[str] = []
    for r in range(rounds):
        name = f"gone{r}"
        store.put_concept(concept("alice", name, seed * 1000 + r))
        Sharing(store).share("alice", name, "bob")
        c, d = handle(store, seed * 1000 + r * 10 + 3), handle(store, seed * 1000 + r * 10 + 4)
        start = threading.Barrier(2)

        def share_dave():
            start.wait()
            try:
                return Sharing(c).share("alice", name, "dave")
            except ConceptNotFound:  # the deletion came first: refused, a fine outcome
                return None

        def delete():
            start.wait()
            return forget_concept(d, "alice", name)

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(share_dave), pool.submit(delete)]
            for f in futures:
                f.result()
        store.put_concept(concept("alice", name, seed * 1000 + r + 500))
        for tenant in ("bob", "dave"):
            if _usable(store, tenant, "alice", name):
                violations.append(f"round {r}: {tenant} can use alice/{name} retrained after its deletion")
    return {"rounds": rounds, "violations": violations}


# -- jobs on a local Ray ------------------------------------------------------------------------------------


def photo(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def write_request(root: Path, store_uri: str, subjects=SUBJECTS) -> Path:
    entries = []
    for i, (owner, name) in enumerate(subjects):
        folder = root / "photos" / owner / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(3):
            photo(100 * i + j).save(folder / f"{j}.png")
        entries.append({"owner": owner, "name": name, "photos": str(folder)})
    path = root / "request.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny", "store": store_uri, "recipe": RECIPE, "subjects": entries}))
    return path


def audit(store: ArtifactStore, subjects=SUBJECTS) -> dict:
    """Per store: subjects without a loadable version, with more than one, and versions that do not load."""
    lost, twice, unreadable = [], [], []
    for owner, name in subjects:
        versions = store.versions(owner, name)
        loadable = 0
        for v in versions:
            try:
                store.get_concept(owner, name, v)
                loadable += 1
            except ArtifactError:
                unreadable.append(f"{owner}/{name} v{v}")
        if loadable == 0:
            lost.append(f"{owner}/{name}")
        if len(versions) > 1:
            twice.append(f"{owner}/{name} versions {versions}")
    return {"lost": lost, "trained_twice": twice, "unreadable": unreadable}


def kill_run(workdir: Path, delay_s: float | None, max_failures: int = 3) -> dict:
    """One job of 3 subjects (one per pack) whose Ray Train worker is SIGKILLed `delay_s` after it appears
    (None: not killed, its worker's lifetime measured)."""
    from cluster.personalize import JobOptions, run_job
    from cluster.request import load_request

    store_uri = (workdir / "store").as_uri()
    path = write_request(workdir, store_uri)
    with WorkerKiller(delay_s=delay_s) as killer:
        summary = run_job(load_request(str(path)), JobOptions(
            workers=1, pack_size=1, max_failures=max_failures, progress=False,
            storage_path=str(workdir / "ray_results")))
    store = open_store(store_uri)
    found = audit(store)
    return {"delay_s": None if delay_s is None else round(delay_s, 2), "killed": bool(killer.killed),
            "worker_lifetime_s": killer.lifetime_s, "counts": summary["counts"], "error": summary["error"],
            # where kills landed: subjects found committed but unmarked (recovered), numbers a dead writer held
            "recovered": sum(bool(r.get("recovered")) for r in summary["subjects"]),
            "numbers_skipped": sum(max(store.versions(o, n), default=1) - 1 for o, n in SUBJECTS), **found}


def fault_run(workdir: Path, endpoint: str, every: int, local: bool = False) -> dict:
    """One job of 3 subjects into S3 through a proxy answering every `every`-th request 503
    (`local`: the workers' code in this process, no Ray)."""
    import boto3

    from cluster.personalize import JobOptions, run_job
    from cluster.request import load_request

    bucket = f"yollava-faults-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    store_uri = f"s3://{bucket}/store"
    path = write_request(workdir, store_uri)
    with _env(AWS_ENDPOINT_URL_S3=None), FaultyS3Proxy(endpoint, every) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url  # the driver and (through store options) the workers
        summary = run_job(load_request(str(path)), JobOptions(
            workers=1, pack_size=1, progress=False, storage_path=str(workdir / "ray_results"), local=local))
    found = audit(open_store(store_uri, endpoint_url=endpoint))
    return {"every": every, "requests": proxy.requests, "answered_503": proxy.failed, "counts": summary["counts"],
            "error": summary["error"], **found}


@contextmanager
def _env(**values: str | None) -> Iterator[None]:
    def put(env: dict[str, str | None]) -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in values}
    try:
        put(values)
        yield
    finally:
        put(old)


@contextmanager
def s3_server() -> Iterator[str]:
    """CI's S3 endpoint (`YOLLAVA_TEST_S3_ENDPOINT`), else a moto server in this process."""
    external = os.environ.get("YOLLAVA_TEST_S3_ENDPOINT")
    if external:
        yield external
        return
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def job_ok(row: dict) -> bool:
    return row["error"] is None and set(row["counts"]) == {"trained"} and not (
        row["lost"] or row["trained_twice"] or row["unreadable"])


# -- command line -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", choices=["races", "kill", "s3"], default=["races", "kill", "s3"])
    ap.add_argument("--race-rounds", type=int, default=50)
    ap.add_argument("--kill-runs", type=int, default=10)
    ap.add_argument("--max-delay", type=float, default=None,
                    help="latest kill, seconds after the worker appears (default: a calibration run's worker life)")
    ap.add_argument("--fault-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    for k, v in DUMMY_AWS.items():
        os.environ.setdefault(k, v)
    logging.getLogger("cluster.policy").setLevel(logging.ERROR)  # the bench's stores have no owner policy
    rng = random.Random(args.seed)
    result: dict = {}
    with ExitStack() as stack:
        root = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="reliability-")))
        endpoint = stack.enter_context(s3_server()) if {"races", "s3"} & set(args.parts) else None
        if "races" in args.parts:
            result["races"] = _races(root, endpoint, args.race_rounds, args.seed)
        if {"kill", "s3"} & set(args.parts):
            _start_ray()
        if "kill" in args.parts:
            result["kill"] = _kills(root, args.kill_runs, args.max_delay, rng)
        if "s3" in args.parts:
            row = fault_run(root / "s3", endpoint, args.fault_every)
            result["s3"] = {**row, "ok": job_ok(row)}
    _print(result)
    print(json.dumps(result))
    return result


def _races(root: Path, endpoint: str, rounds: int, seed: int) -> dict:
    import boto3

    out = {}
    bucket = f"yollava-races-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    stores = {"file": open_store((root / "races").as_uri()),
              "s3": open_store(f"s3://{bucket}/races", endpoint_url=endpoint)}
    for backend, store in stores.items():
        w = race_writers(store, rounds, seed=seed)
        s = race_shares(store, rounds, seed=seed)
        d = race_delete(store, rounds, seed=seed)
        out[backend] = {"writer_rounds": w["rounds"], "writer_violations": len(w["violations"]),
                        "reads_during_writes": w["reads"], "share_rounds": s["rounds"],
                        "share_violations": len(s["violations"]), "delete_rounds": d["rounds"],
                        "delete_violations": len(d["violations"]),
                        "examples": (w["violations"] + s["violations"] + d["violations"])[:3]}
    return out


def _start_ray() -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in DUMMY_AWS}})


def _kills(root: Path, runs: int, max_delay: float | None, rng: random.Random) -> dict:
    if max_delay is None:  # how long a worker lives in an undisturbed job here
        calib = kill_run(root / "calibration", delay_s=None)
        if not job_ok(calib) or calib["worker_lifetime_s"] is None:
            raise RuntimeError(f"the calibration run (no kill) did not succeed: {calib}")
        max_delay = calib["worker_lifetime_s"]
    rows = [kill_run(root / f"kill{i}", delay_s=rng.uniform(0.2, max_delay)) for i in range(runs)]
    return {"runs": runs, "max_delay_s": round(max_delay, 1), "kills_landed": sum(r["killed"] for r in rows),
            "recovered_after_manifest": sum(r["recovered"] for r in rows),
            "version_numbers_left_by_dead_writers": sum(r["numbers_skipped"] for r in rows),
            "subjects_lost": sum(len(r["lost"]) for r in rows),
            "subjects_trained_twice": sum(len(r["trained_twice"]) for r in rows),
            "unreadable_versions": sum(len(r["unreadable"]) for r in rows),
            "jobs_not_ok": sum(not job_ok(r) for r in rows), "rows": rows}


def _print(result: dict) -> None:
    for backend, r in result.get("races", {}).items():
        print(f"races {backend:>4}: {r['writer_rounds']} writer rounds ({r['reads_during_writes']} reads during "
              f"writes), violations {r['writer_violations']}; {r['share_rounds']} share/unshare rounds, "
              f"violations {r['share_violations']}; {r['delete_rounds']} share/delete rounds, "
              f"violations {r['delete_violations']}")
    if "kill" in result:
        k = result["kill"]
        print(f"kill: {k['runs']} runs, kills landed {k['kills_landed']} (delay <= {k['max_delay_s']} s): "
              f"lost {k['subjects_lost']}, trained twice {k['subjects_trained_twice']}, "
              f"unreadable {k['unreadable_versions']}, jobs not ok {k['jobs_not_ok']} (recovered after a manifest "
              f"{k['recovered_after_manifest']}, version numbers left by dead writers "
              f"{k['version_numbers_left_by_dead_writers']})")
    if "s3" in result:
        s = result["s3"]
        print(f"s3 503 every {s['every']}: {s['answered_503']} of {s['requests']} requests failed; counts "
              f"{s['counts']}, lost {len(s['lost'])}, trained twice {len(s['trained_twice'])}, "
              f"unreadable {len(s['unreadable'])}")


if __name__ == "__main__":
    main()
