"""Operating a running deployment.

    python -m cluster.ops status [--address auto] [--store URI]
    python -m cluster.ops scale --gpus N [--cpus-per-gpu C] | --release [--job JOB_ID]
    python -m cluster.ops concepts ls [--owner OWNER] --store URI
    python -m cluster.ops concepts rm OWNER/NAME [--version V] --store URI
    python -m cluster.ops migrate --store URI

`status` shows nodes and GPUs (total, free, used), the autoscaler request in
force and each job's share of it (`cluster.resources`), personalization jobs
(from the Ray Jobs API, and their progress from the store's job records) and
the Serve applications with their replicas. `scale --gpus` holds the
operator's share of the autoscaler request ahead of a batch, next to the
jobs' own shares; `--release` ends the operator's share and the shares of
jobs whose driver has died (`--job ID`: that job's share, even if it lives),
so idle nodes can go. `concepts rm OWNER/NAME` forgets the whole concept
(grants, versions, done-markers, job records: `cluster.lifecycle`);
`--version V` deletes that version only. `migrate` brings a store written
before one-object-per-grant up to date (`cluster.shares.migrate_legacy`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import ray
from ray.exceptions import AuthenticationError, RayActorError
from ray.job_submission import JobSubmissionClient

from cluster import resources
from cluster.lifecycle import forget_concept
from cluster.queue import ConceptBusy
from cluster.shares import migrate_legacy
from cluster.store import ArtifactStore, ConceptNotFound, open_store
from yollava.tokens import check_name

REQUEST_KEY = b"autoscaler_resource_request"  # ray_constants.AUTOSCALER_RESOURCE_REQUEST_CHANNEL
# What the Jobs API client raises when there is no dashboard to ask, or it will not answer:
# OSError (the builtin ConnectionError, requests' errors), RuntimeError ("request failed with
# status code ...", a dashboard without the Jobs API, ray[default] not installed), and an
# authentication token the cluster refuses.
JOBS_API_UNREACHABLE = (OSError, RuntimeError, AuthenticationError)


def connect(address: str | None) -> None:
    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
        except ConnectionError as e:
            raise SystemExit(f"no Ray cluster at address={address or 'auto'!r}: {e}") from None


def nodes() -> dict[str, Any]:
    alive = [n for n in ray.nodes() if n.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()
    gpus = total.get("GPU", 0.0)
    return {"nodes": len(alive), "cpus": total.get("CPU", 0.0), "cpus_free": free.get("CPU", 0.0),
            "gpus": gpus, "gpus_free": free.get("GPU", 0.0), "gpus_used": gpus - free.get("GPU", 0.0),
            "per_node": [{"node_id": n["NodeID"][:12], "ip": n.get("NodeManagerAddress"),
                          "resources": {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU", "memory")}}
                         for n in alive]}


def resource_request() -> list[dict]:
    """The autoscaler request in force (v1 autoscaler's key; [] when none)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(REQUEST_KEY)
    return json.loads(raw) if raw else []


def scale(gpus: int | None, cpus_per_gpu: int = 4, release: bool = False, job: str | None = None) -> list[dict]:
    """Hold the operator's share (`gpus` bundles) or release shares; returns the request now in force."""
    if release:
        resources.release(job)
        return resources.sync()
    if gpus is None or gpus < 1:
        raise ValueError(f"--gpus={gpus!r} must be >= 1 (or use --release)")
    resources.set_job_request(resources.OPERATOR, [{"GPU": 1, "CPU": cpus_per_gpu}] * gpus)
    return resources.sync()


def jobs(store: ArtifactStore | None) -> list[dict]:
    """Personalization jobs: Ray Jobs API entries, and progress from the store's records."""
    out: dict[str, dict] = {}
    try:
        listed = JobSubmissionClient().list_jobs()
    except JOBS_API_UNREACHABLE as e:  # no dashboard (e.g. a bare local Ray): say so, keep going
        out["_jobs_api"] = {"job": "-", "status": f"jobs API unavailable: {type(e).__name__}"}
        listed = []
    for j in listed:
        if "cluster.personalize" in (j.entrypoint or ""):
            out[j.submission_id or j.job_id] = {"job": j.submission_id or j.job_id, "status": str(j.status),
                                                "entrypoint": j.entrypoint}
    if store is not None:
        for job_id in sorted({k.split("/")[1] for k in store.list_prefix("jobs")}):
            row = out.setdefault(job_id, {"job": job_id, "status": "recorded"})
            done = [k for k in store.list_prefix(f"jobs/{job_id}/subjects")]
            row["subjects_recorded"] = len(done)
            if store.exists(f"jobs/{job_id}/summary.json"):
                summary = store.get_json(f"jobs/{job_id}/summary.json")
                row["status"] = "finished" if row["status"] == "recorded" else row["status"]
                row["subjects"] = len(summary.get("subjects", []))
    return list(out.values())


def serve_status() -> list[dict]:
    """Serve applications, their deployments and replica counts by state ([] when Serve never started)."""
    try:
        from ray import serve
        from ray.serve.exceptions import RayServeException
    except ImportError as e:  # a cluster-only install (no ray[serve]): nothing can be serving from here
        return [{"application": "-", "status": f"Serve not installed ({type(e).__name__}: {e})"}]
    try:
        st = serve.status()
    except (RayServeException, RayActorError) as e:  # the controller is gone or unreachable
        return [{"application": "-", "status": f"Serve not running ({type(e).__name__})"}]
    rows = []
    for app_name, app in st.applications.items():
        for dep_name, dep in app.deployments.items():
            rows.append({"application": app_name, "deployment": dep_name, "status": str(dep.status),
                         "replicas": {str(k): v for k, v in dep.replica_states.items()}})
    return rows


def status(store: ArtifactStore | None) -> dict:
    return {"cluster": nodes(), "autoscaler_request": resource_request(),
            "autoscaler_shares": {h: {k: e[k] for k in ("bundles", "dead", "host", "pid", "at")}
                                  for h, e in resources.shares().items()},
            "jobs": jobs(store), "serve": serve_status()}


def concepts_ls(store: ArtifactStore, owner: str | None) -> list[dict]:
    if owner is not None:
        check_name(owner, "owner")
    return [{"owner": r.owner, "name": r.name, "version": r.version} for r in store.list_concepts(owner)]


def concepts_rm(store: ArtifactStore, ref: str, version: int | None) -> dict:
    """Forget a whole concept (grants, versions, markers, records) or delete one version."""
    owner, sep, name = ref.partition("/")
    if not sep:
        raise ValueError(f"concept={ref!r} must be OWNER/NAME")
    check_name(owner, "owner")
    check_name(name, "name")
    if version is None:
        report = forget_concept(store, owner, name)
        deleted = report["versions"]
    else:
        deleted = store.delete_concept(owner, name, version)
        report = {"versions": deleted}
    if not deleted and not report.get("uploads"):
        raise ConceptNotFound(owner, name, version)
    return {"deleted": deleted, **{k: v for k, v in report.items() if k not in ("owner", "name", "versions")}}


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.ops", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="nodes, GPUs, jobs, Serve replicas")
    st.add_argument("--address", default=None)
    st.add_argument("--store", default=None, help="artifact store, for job progress")
    sc = sub.add_parser("scale", help="autoscaler resource requests")
    sc.add_argument("--address", default=None)
    g = sc.add_mutually_exclusive_group(required=True)
    g.add_argument("--gpus", type=int)
    g.add_argument("--release", action="store_true",
                   help="end the operator's share and those of jobs whose driver died")
    sc.add_argument("--job", help="with --release: end this job's share (even if its driver lives)")
    sc.add_argument("--cpus-per-gpu", type=int, default=4)
    co = sub.add_parser("concepts", help="list or delete concepts in a store")
    co.add_argument("action", choices=["ls", "rm"])
    co.add_argument("ref", nargs="?", help="OWNER/NAME (rm)")
    co.add_argument("--owner")
    co.add_argument("--version", type=int)
    co.add_argument("--store", required=True)
    mi = sub.add_parser("migrate", help="bring a store's layout up to date (share documents -> grants)")
    mi.add_argument("--store", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "scale" and args.job and not args.release:
        ap.error("--job goes with --release only")
    try:
        if args.cmd == "migrate":
            _print(migrate_legacy(open_store(args.store)))
            return 0
        if args.cmd == "concepts":
            store = open_store(args.store)
            if args.action == "ls":
                _print(concepts_ls(store, args.owner))
            else:
                if not args.ref:
                    ap.error("concepts rm needs OWNER/NAME")
                _print(concepts_rm(store, args.ref, args.version))
            return 0
        connect(args.address)
        if args.cmd == "status":
            _print(status(open_store(args.store) if args.store else None))
        else:
            _print({"requested": scale(args.gpus, args.cpus_per_gpu, args.release, args.job)})
        return 0
    except (ValueError, ConceptNotFound, ConceptBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
