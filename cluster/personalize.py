"""Batch personalization on Ray: one request file in, one concept per subject in the store.

    python -m cluster.personalize REQUEST [--store URI] [--model ID] [--workers N]
        [--gpus-per-worker G] [--cpus-per-worker C] [--pack-size P] [--deepspeed CONFIG]
        [--force] [--job-id ID] [--policy FILE|s3://...] [--max-pixels N] [--max-failures N]
        [--no-progress]

The same command runs on a laptop (a local Ray is started) and as
`ray job submit --working-dir . -- python -m cluster.personalize REQUEST ...`.

Order of work: parse the request (a malformed one exits 2 naming the field);
check it against the owner policy (`cluster.policy`: a subject on photos
outside its owner's prefixes refuses the request, exit 2); read and decode
every photo (a bad subject is set aside with its reason; a store that cannot
be reached or refuses access stops the job, exit 1); claim the job id (a
reused one exits 2); fingerprint the base model; embed the negative pool (Ray
Data, reused when stored); skip subjects whose content key is already done
(by a marker whose version still exists); hold this job's share of the
autoscaler request (`cluster.resources`, released at the end); train the
packs with a Ray Train `TorchTrainer`; write and print the job summary. The exit code is 0 only when every subject is trained
or done before and training ended without an error (which the summary's
`error` and stderr name).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cluster.keys import job_prefix, subject_key, subject_record_key
from cluster.packing import make_packs
from cluster.policy import OwnerPolicy, PolicyError, load_policy
from cluster.resources import job_request
from cluster.request import (DEFAULT_MAX_PHOTO_BYTES, PHOTO_ERRORS, CheckedSubject, PersonalizationRequest, Photo,
                             RequestError, SourceUnavailable, check_subjects, load_request, read_source,
                             s3_endpoint)
from cluster.store import ArtifactStore, ObjectNotFound, open_store
from cluster.worker import JobConfig, SubjectTask, deepspeed_config, read_done_marker, train_func
from yollava.data import DEFAULT_MAX_PIXELS
from yollava.tokens import check_name

log = logging.getLogger("cluster.personalize")


@dataclass
class JobOptions:
    """How to run a request; the command-line options."""

    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    pack_size: int = 4
    deepspeed: dict | None = None
    force: bool = False
    job_id: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_photo_bytes: int = DEFAULT_MAX_PHOTO_BYTES
    max_failures: int = 2
    progress: bool = True
    storage_path: str | None = None  # Ray Train's run folder (no checkpoints are kept there)
    dtype: str | None = None
    local: bool = False  # no Ray at all: one process trains every pack (debugging, benchmarks)
    policy: str | None = None  # the owner policy (cluster.policy): a file or s3:// URI; default: the store's

    def __post_init__(self) -> None:
        for name in ("workers", "pack_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ValueError("gpus_per_worker and cpus_per_worker must be >= 0")
        if self.job_id is not None:
            check_name(self.job_id, "job_id")
        if self.local and self.deepspeed:
            raise ValueError("--local runs one process: it cannot shard the backbone with --deepspeed")


@dataclass
class Plan:
    """What a job will do, decided on the driver before any worker starts."""

    job_id: str
    store: ArtifactStore
    fingerprint: str
    recipe: dict
    entries: list[dict] = field(default_factory=list)  # summary rows decided up front (invalid, done)
    tasks: list[SubjectTask] = field(default_factory=list)
    pool_photos: list[Photo] = field(default_factory=list)
    pool_info: Any = None
    photos: dict[tuple[str, str], list[Photo]] = field(default_factory=dict)  # of the subjects to train
    error: str | None = None  # why training stopped early, if it did


# -- the job ---------------------------------------------------------------------------------------


def run_job(request: PersonalizationRequest, options: JobOptions) -> dict:
    """Run a validated request to the end; returns the summary (also written to the store)."""
    t0 = time.perf_counter()
    job_id = options.job_id or new_job_id()
    store = open_request_store(request.store)
    policy = load_policy(options.policy, store)
    checked = check_subjects(request, options.max_pixels, options.max_photo_bytes, policy)
    pool_photos = read_pool(request, checked, options, policy)
    claim_job_id(store, job_id)
    backbone = encoder = None
    if options.local:
        from yollava.backbone import load_backbone
        from yollava.mining import VisionTowerEncoder

        backbone = load_backbone(request.base_model, dtype=options.dtype)
        encoder = VisionTowerEncoder(backbone)
        fingerprint, encoder_name = backbone.fingerprint, encoder.name
    else:
        import ray

        if not ray.is_initialized():
            ray.init()  # under `ray job submit`, RAY_ADDRESS names the cluster; else a local one starts
        fingerprint, encoder_name = ray.get(describe_model.remote(request.base_model, options.dtype))
    plan = Plan(job_id, store, fingerprint, request.recipe_config().to_dict(), pool_photos=pool_photos)
    if pool_photos:
        from cluster.negatives import ensure_index

        plan.pool_info, built = ensure_index(store, pool_photos, request.base_model, encoder_name, encoder)
        log.info("negative pool: %d images, index %s", len(pool_photos), "built" if built else "reused")
    plan_subjects(plan, checked, options.force)
    if plan.tasks and options.local:
        train_local(plan, request, options, backbone)
    elif plan.tasks:
        train(plan, request, options)
    summary = summarize(plan, request, checked, time.perf_counter() - t0)
    store.put_json(f"{job_prefix(job_id)}/summary.json", summary)
    return summary


def new_job_id() -> str:
    return f"job-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def claim_job_id(store: ArtifactStore, job_id: str) -> None:
    """Take `jobs/<job_id>/` for this run, or refuse the id (RequestError) if any run had it.

    A job reads its subjects' records back from `jobs/<job_id>/subjects/`; an
    earlier run's records there would be read as this run's, so an id is
    used once. The claim is a create-if-absent write of `jobs/<id>/job.json`.
    """
    prefix = job_prefix(job_id)
    claim = json.dumps({"job_id": job_id, "run": uuid.uuid4().hex, "host": socket.gethostname(),
                        "pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                       sort_keys=True).encode()
    refused = RequestError(f"--job-id: job_id={job_id!r} was already used in {store.uri} ({prefix}/ exists): a "
                           "job's records are its own; choose another id, or leave --job-id out")
    if store.list_prefix(prefix):  # also runs from before claims, which left no job.json
        raise refused
    if not store.put_if_absent(f"{prefix}/job.json", claim) and store.get_bytes(f"{prefix}/job.json") != claim:
        raise refused


def store_options(uri: str) -> dict:
    """Options to open the store with, the S3 endpoint made explicit so that workers use it too."""
    endpoint = s3_endpoint()
    return {"endpoint_url": endpoint} if uri.startswith("s3://") and endpoint else {}


def open_request_store(uri: str) -> ArtifactStore:
    return open_store(uri, **store_options(uri))


def read_pool(request: PersonalizationRequest, checked: list[CheckedSubject], options: JobOptions,
              policy: OwnerPolicy | None = None) -> list[Photo]:
    """The negative pool, minus any image that is one of the subjects' photos (of any owner)."""
    if request.negatives is None:
        return []
    try:
        pool = read_source("negatives", request.negatives, options.max_pixels, options.max_photo_bytes,
                           policy.check_negative if policy is not None else None)
    except PHOTO_ERRORS as e:
        raise RequestError(f"field negatives: {e}") from e
    private = {p.sha256 for s in checked for p in s.photos}
    kept = [p for p in pool if p.sha256 not in private]
    if len(kept) < len(pool):
        log.warning("negative pool: %d image(s) are subjects' own photos and are left out",
                    len(pool) - len(kept))
    return kept


def _describe_model(model_id: str, dtype: str | None) -> tuple[str, str]:
    """(weights fingerprint, name of the vision-tower encoder) of a base model."""
    from yollava.backbone import load_backbone
    from yollava.mining import VisionTowerEncoder

    backbone = load_backbone(model_id, dtype=dtype)
    return backbone.fingerprint, VisionTowerEncoder(backbone).name


class _Remote:
    """`describe_model.remote(...)`: a Ray task made on first use, so importing needs no Ray."""

    def remote(self, *args):
        import ray

        return ray.remote(num_cpus=1)(_describe_model).remote(*args)


describe_model = _Remote()


def plan_subjects(plan: Plan, checked: list[CheckedSubject], force: bool) -> None:
    """Key every valid subject; those already done (and not forced) are not trained."""
    pool_key = plan.pool_info.key if plan.pool_info else None
    for s in checked:
        if not s.valid:
            plan.entries.append(_entry(s.owner, s.name, "invalid", reason=s.reason))
            continue
        key = subject_key(s.owner, s.name, [p.sha256 for p in s.photos], plan.recipe, plan.fingerprint, pool_key)
        marker = read_done_marker(plan.store, s.owner, s.name, key)
        if marker is not None and not force:
            plan.entries.append(_entry(s.owner, s.name, "done-before", key=key, version=marker["version"],
                                       trained_by=marker.get("job_id")))
            continue
        plan.tasks.append(SubjectTask(s.owner, s.name, key, [p.sha256 for p in s.photos], [],
                                      s.description))
        plan.photos[s.owner, s.name] = s.photos


def _entry(owner: str, name: str, status: str, **extra) -> dict:
    return {"owner": owner, "name": name, "status": status, **extra}


# -- training on Ray -----------------------------------------------------------------------------


def train(plan: Plan, request: PersonalizationRequest, options: JobOptions) -> None:
    """Ship photos to the object store, ask for resources, run the TorchTrainer, show progress."""
    import ray

    for t in plan.tasks:  # every worker gets the refs; only the one that trains a subject fetches its bytes
        t.photo_refs = [ray.put(p.data) for p in plan.photos[t.owner, t.name]]
    pool_ids = set(plan.pool_info.ids) if plan.pool_info else set()
    job = _job_config(plan, request, options,
                      {p.sha256: ray.put(p.data) for p in plan.pool_photos if p.sha256 in pool_ids})
    packs = job.packs
    workers = options.workers if options.deepspeed else min(options.workers, len(packs))
    bundle = {"CPU": options.cpus_per_worker, **({"GPU": options.gpus_per_worker} if options.gpus_per_worker else {})}
    trainer = make_trainer(job, workers, bundle, options)
    log.info("job %s: %d subject(s) in %d pack(s) on %d worker(s)", plan.job_id, len(plan.tasks), len(packs), workers)
    # This job's share of the autoscaler request, next to other jobs' (cluster.resources); released at the end.
    with job_request(plan.job_id, [bundle] * workers):
        _fit_with_progress(trainer, plan, options.progress)


def make_trainer(job: JobConfig, workers: int, bundle: dict, options: JobOptions):
    """The Ray Train `TorchTrainer` that runs `train_func` on `workers` workers of `bundle` each."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_func, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=options.gpus_per_worker > 0,
                                     resources_per_worker=bundle),
        run_config=RunConfig(name=job.job_id, storage_path=options.storage_path,
                             failure_config=FailureConfig(max_failures=options.max_failures)))


def train_local(plan: Plan, request: PersonalizationRequest, options: JobOptions, backbone) -> None:
    """Every pack in this process, on an already loaded backbone: the worker's code without Ray."""
    from cluster.worker import PackRunner

    for t in plan.tasks:
        t.photo_refs = [p.data for p in plan.photos[t.owner, t.name]]
    job = _job_config(plan, request, options, {p.sha256: p.data for p in plan.pool_photos})
    runner = PackRunner(job, backbone)
    with tqdm(total=len(plan.tasks), desc=plan.job_id, unit="subject", disable=not options.progress) as bar:
        for pack in job.packs:
            runner.run(pack)
            bar.update(len(pack))


def _job_config(plan: Plan, request: PersonalizationRequest, options: JobOptions, pool_refs: dict) -> JobConfig:
    pool_ids = set(plan.pool_info.ids) if plan.pool_info else set()
    return JobConfig(plan.job_id, plan.store.uri, request.base_model, plan.fingerprint, plan.recipe,
                     make_packs(plan.tasks, options.pack_size), plan.pool_info,
                     {k: v for k, v in pool_refs.items() if k in pool_ids}, options.force,
                     deepspeed_config(options.deepspeed) if options.deepspeed else None, options.dtype,
                     progress=False, store_options=store_options(plan.store.uri))


def _fit_with_progress(trainer, plan: Plan, progress: bool) -> None:
    """trainer.fit() in a thread; the bar counts subject records as workers write them.

    Whatever ends the fit with an error is kept as `plan.error`: it goes into
    the summary (subjects without a record fail with it) and fails the job.
    """
    error: list[BaseException] = []

    def fit():
        try:
            trainer.fit()
        except BaseException as e:  # handed to the driver's thread, below: it fails the job
            error.append(e)

    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    prefix = f"{job_prefix(plan.job_id)}/subjects"
    with tqdm(total=len(plan.tasks), desc=f"{plan.job_id}", unit="subject", disable=not progress) as bar:
        while thread.is_alive():
            thread.join(timeout=2.0)
            done = len(plan.store.list_prefix(prefix))
            bar.update(done - bar.n)
    if error:
        log.error("training ended with an error: %s", error[0])
        plan.error = f"{type(error[0]).__name__}: {error[0]}"


# -- the summary ---------------------------------------------------------------------------------


def summarize(plan: Plan, request: PersonalizationRequest, checked: list[CheckedSubject], seconds: float) -> dict:
    """Per subject, in request order: status, version, metrics, seconds (and reason when not trained)."""
    decided = {(e["owner"], e["name"]): e for e in plan.entries}
    rows = []
    for s in checked:
        if (s.owner, s.name) in decided and not any(t.owner == s.owner and t.name == s.name for t in plan.tasks):
            rows.append(decided[s.owner, s.name])
            continue
        try:
            record = plan.store.get_json(subject_record_key(plan.job_id, s.owner, s.name))
            record.pop("usage", None)
            rows.append(record)
        except ObjectNotFound:
            rows.append(_entry(s.owner, s.name, "failed", reason=plan.error or "no result: the job ended first"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"job_id": plan.job_id, "base_model": request.base_model, "base_fingerprint": plan.fingerprint,
            "store": plan.store.uri, "recipe": plan.recipe, "seconds": round(seconds, 2),
            "negative_pool": plan.pool_info.key if plan.pool_info else None, "error": plan.error,
            "counts": counts, "subjects": rows}


def format_summary(summary: dict) -> str:
    lines = [f"job {summary['job_id']}  ({summary['seconds']:.1f}s)  {summary['counts']}",
             f"{'subject':<32} {'status':<12} {'version':>7} {'s/subj':>7}  metrics / reason"]
    for r in summary["subjects"]:
        metrics = r.get("metrics") or {}
        detail = r.get("reason") or " ".join(f"{k}={v:.3g}" for k, v in metrics.items() if k != "epoch")
        secs = f"{r['seconds']:.1f}" if isinstance(r.get("seconds"), (int, float)) else "-"
        lines.append(f"{r['owner'] + '/' + r['name']:<32} {r['status']:<12} {str(r.get('version', '-')):>7} "
                     f"{secs:>7}  {detail}")
    if summary.get("error"):
        lines.append(f"training failed: {summary['error']}")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cluster.personalize", description=__doc__.split("\n")[0])
    ap.add_argument("request", help="request file (YAML or JSON): a local path or s3://bucket/key")
    ap.add_argument("--store", help="artifact store URI (overrides the request's `store`)")
    ap.add_argument("--model", help="base model (overrides the request's `base_model`)")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    ap.add_argument("--cpus-per-worker", type=float, default=1)
    ap.add_argument("--pack-size", type=int, default=4, help="subjects trained together per pack")
    ap.add_argument("--deepspeed", help="DeepSpeed JSON config (ZeRO stage 3): shard the backbone across workers")
    ap.add_argument("--force", action="store_true", help="train a new version even of finished subjects")
    ap.add_argument("--job-id", help="job name in the store, used once (default: job-<time>-<random>)")
    ap.add_argument("--policy", help="owner policy, a YAML file or s3:// URI (default: $YOLLAVA_POLICY, "
                                     "else the store's policy/owners.yaml; see cluster.policy)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest photo accepted")
    ap.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    ap.add_argument("--storage-path", help="Ray Train run folder (default ~/ray_results)")
    ap.add_argument("--dtype", help="float32 (default), bfloat16, float16")
    ap.add_argument("--local", action="store_true", help="no Ray: train every pack in this process")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        request = load_request(args.request, {"store": args.store, "base_model": args.model})
        options = JobOptions(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                             cpus_per_worker=args.cpus_per_worker, pack_size=args.pack_size,
                             deepspeed=_read_json(args.deepspeed) if args.deepspeed else None,
                             force=args.force, job_id=args.job_id, max_pixels=args.max_pixels,
                             max_failures=args.max_failures, progress=not args.no_progress,
                             storage_path=args.storage_path, dtype=args.dtype, local=args.local,
                             policy=args.policy)
        if options.deepspeed:
            deepspeed_config(options.deepspeed)
    except ValueError as e:  # RequestError included: the message names the field
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_job(request, options)
    except (RequestError, PolicyError) as e:  # PolicyError names the subject, owner and photo
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SourceUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(json.dumps({"job_id": summary["job_id"], "counts": summary["counts"]}))
    return exit_code(summary)


def exit_code(summary: dict) -> int:
    """0 when every subject is trained or done and training ended cleanly; else 1, saying why on stderr."""
    if summary["error"]:
        print(f"error: job {summary['job_id']}: training failed: {summary['error']}", file=sys.stderr)
        return 1
    return 0 if set(summary["counts"]) <= {"trained", "done-before"} else 1


def _read_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--deepspeed={path!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--deepspeed={path!r} must hold a JSON object")
    return data


if __name__ == "__main__":
    sys.exit(main())
