"""The upload queue: subjects that tenants upload, packed into `cluster.personalize` jobs.

The chat service takes a tenant's photos (`POST /v1/concepts`, `serve/uploads.py`) and
commits them here; a `Dispatcher` (one per service: the `UploadQueue` deployment)
collects what waits, from every tenant, into one batch, and submits the batch as one
Ray job through Ray's job API (`python -m cluster.personalize REQUEST`, the entry point
of `ray job submit`). Every state lives in the store, so a dispatcher that restarts (a
redeploy, a crash) carries on from what the store says; it keeps nothing in memory.

Layout under the store's root (beside `concepts/`, `done/`, `jobs/`)::

    uploads/<tenant>/<name>/<upload>/photos/<NN>.png   the photos, validated and normalised
                                                        (deleted once the upload is final)
    uploads/<tenant>/<name>/<upload>/upload.json       the upload's commit point, after its photos
    uploads/<tenant>/<name>/<upload>/claim.json        the one batch that trains it (create-if-absent)
    uploads/<tenant>/<name>/<upload>/result.json       final: ready (version, metrics) or failed (reason)
    queue/pending/<upload>.json                        an unfinished upload (first written, last removed)
    queue/batches/<batch>/batch.json                   the uploads a batch asked for (before any claim)
    queue/batches/<batch>/request.json                 its members as a personalization request
    queue/batches/<batch>/attempts/<n>.json            attempt n: its Ray job (create-if-absent, then submit)
    queue/batches/<batch>/done.json                    every member is final

An upload is `queued` (committed, unclaimed), `training` (claimed by a batch), then
`ready` or `failed` (its result). Why nothing is trained twice or lost:

* an upload exists once `upload.json` is written (after its photos); a pending marker
  without one, older than `abandon_s`, is an upload whose writer died: removed;
* a batch writes its document, then claims each upload create-if-absent: an upload
  belongs to the batch its claim names, forever, and a batch's members are the uploads
  of its document whose claim names it (the same answer whoever asks, whenever);
* an attempt is recorded create-if-absent before its job is submitted, with the job id
  as the Ray submission id (which Ray refuses twice). Ray that does not know the job:
  submitted again if the job never started (no `jobs/<id>/` in the store), else the next
  attempt. A job that ended without a summary (killed, its driver lost) gets the next
  attempt, with the same members: `cluster.personalize` keys subjects by content, so
  what the dead job finished is `done-before`, never trained again (ADR 003 §2);
* results are written create-if-absent from the job's summary; then the photos and the
  pending marker go. A batch with no unfinished member is over.

Two dispatchers at once (a redeploy overlapping the old replica) stay safe where the
store's create-if-absent is atomic (files, AWS S3, MinIO; ADR 003 §7): one claim, one
attempt record each.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.keys import job_prefix, progress_key, subject_record_key
from cluster.policy import PolicyError, load_policy
from cluster.store import ArtifactStore, FileStore, ObjectNotFound
from yollava.recipe import RecipeConfig
from yollava.tokens import check_name

log = logging.getLogger(__name__)

UPLOADS = "uploads"
QUEUE = "queue"
UPLOAD_ID_RE = re.compile(r"^u-[0-9]{20}-[0-9a-f]{8}$")
BATCH_ID_RE = re.compile(r"^b-[0-9]{20}-[0-9a-f]{8}$")
PHOTO_FILE_RE = re.compile(r"^[0-9]{2}\.png$")

QUEUED, TRAINING, READY, FAILED = "queued", "training", "ready", "failed"
# Ray's job states (ray.job_submission.JobStatus values)
JOB_ACTIVE = ("PENDING", "RUNNING")
JOB_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


# -- ids and keys ---------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    """Time-ordered: `u-20261130081530123456-1a2b3c4d` (sorting by id is sorting by creation)."""
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%d%H%M%S%f}-{uuid.uuid4().hex[:8]}"


def check_upload_id(value: str) -> str:
    if not isinstance(value, str) or not UPLOAD_ID_RE.fullmatch(value):
        raise ValueError(f"upload id {value!r} is not of the form u-<20 digits>-<8 hex>")
    return value


def check_batch_id(value: str) -> str:
    if not isinstance(value, str) or not BATCH_ID_RE.fullmatch(value):
        raise ValueError(f"batch id {value!r} is not of the form b-<20 digits>-<8 hex>")
    return value


def uploads_prefix(tenant: str, name: str | None = None) -> str:
    base = f"{UPLOADS}/{check_name(tenant, 'tenant')}"
    return base if name is None else f"{base}/{check_name(name, 'name')}"


def upload_prefix(tenant: str, name: str, upload_id: str) -> str:
    return f"{uploads_prefix(tenant, name)}/{check_upload_id(upload_id)}"


def pending_key(upload_id: str) -> str:
    return f"{QUEUE}/pending/{check_upload_id(upload_id)}.json"


def batch_prefix(batch_id: str) -> str:
    return f"{QUEUE}/batches/{check_batch_id(batch_id)}"


def attempt_job_id(batch_id: str, attempt: int) -> str:
    """The job's id in the store (`--job-id`) and its Ray submission id: one per attempt."""
    return check_name(f"{check_batch_id(batch_id)}-a{attempt}", "job_id")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _put_json_if_absent(store: ArtifactStore, key: str, obj: Any) -> bool:
    return store.put_if_absent(key, json.dumps(obj, indent=2, sort_keys=True).encode())


def _get_json(store: ArtifactStore, key: str) -> Any | None:
    try:
        return store.get_json(key)
    except ObjectNotFound:
        return None


# -- uploads: what the chat service writes and reads -----------------------------------------------


@dataclass(frozen=True)
class Upload:
    """A committed upload, as `upload.json` says."""

    id: str
    tenant: str
    name: str
    description: str | None
    photos: list[dict]  # {file, sha256, width, height}
    created: str

    @property
    def prefix(self) -> str:
        return upload_prefix(self.tenant, self.name, self.id)

    @classmethod
    def from_doc(cls, doc: dict) -> "Upload":
        return cls(check_upload_id(doc["id"]), check_name(doc["tenant"], "tenant"), check_name(doc["name"], "name"),
                   doc.get("description"), list(doc["photos"]), doc["created"])


def commit_upload(store: ArtifactStore, tenant: str, name: str, description: str | None,
                  photos: list[tuple[bytes, dict]]) -> Upload:
    """Write an upload: its pending marker, its photos (PNG bytes + {sha256, width, height}), then
    `upload.json`, the commit point. A writer that dies before the commit leaves a marker the
    dispatcher removes after `abandon_s`, with whatever photos it wrote."""
    upload_id = _new_id("u")
    prefix = upload_prefix(tenant, name, upload_id)
    store.put_json(pending_key(upload_id), {"tenant": tenant, "name": name, "created": time.time()})
    files = []
    for i, (data, meta) in enumerate(photos):
        file = f"{i:02d}.png"
        store.put_bytes(f"{prefix}/photos/{file}", data)
        files.append({"file": file, **meta})
    doc = {"id": upload_id, "tenant": tenant, "name": name, "description": description, "photos": files,
           "created": _now()}
    store.put_json(f"{prefix}/upload.json", doc)
    return Upload.from_doc(doc)


def _upload_ids(keys: list[str], prefix: str) -> list[str]:
    """Ids of committed uploads among `keys` under `<prefix>/<id>/upload.json`, oldest first."""
    ids = []
    for k in keys:
        rest = k[len(prefix) + 1:].split("/")
        if len(rest) == 2 and rest[1] == "upload.json" and UPLOAD_ID_RE.fullmatch(rest[0]):
            ids.append(rest[0])
    return sorted(ids)


def tenant_uploads(store: ArtifactStore, tenant: str) -> dict[str, list[str]]:
    """name -> committed upload ids of that concept (oldest first), from one listing."""
    base = uploads_prefix(tenant)
    out: dict[str, list[str]] = {}
    for k in store.list_prefix(base):
        parts = k[len(base) + 1:].split("/")
        if len(parts) == 3 and parts[2] == "upload.json" and UPLOAD_ID_RE.fullmatch(parts[1]):
            out.setdefault(parts[0], []).append(parts[1])
    return {n: sorted(ids) for n, ids in out.items()}


def upload_state(store: ArtifactStore, tenant: str, name: str, upload_id: str) -> dict:
    """{status, progress, reason, version, metrics, job_id, attempt} of one committed upload."""
    prefix = upload_prefix(tenant, name, upload_id)
    result = _get_json(store, f"{prefix}/result.json")
    if result is not None:
        return {"status": result["status"], "progress": 1.0, "reason": result.get("reason"),
                "version": result.get("version"), "metrics": result.get("metrics") or {},
                "job_id": result.get("job_id"), "finished": result.get("finished")}
    claim = _get_json(store, f"{prefix}/claim.json")
    if claim is None or claim.get("discarded"):  # (discarded: gone in a moment)
        return {"status": QUEUED, "progress": 0.0}
    batch = claim["batch"]
    attempts = _attempts(store, batch)
    if not attempts:
        return {"status": TRAINING, "progress": 0.02, "stage": "in a batch; its job is being submitted"}
    n = attempts[-1]
    job_id = attempt_job_id(batch, n)
    state = {"status": TRAINING, "job_id": job_id, "attempt": n}
    if store.exists(subject_record_key(job_id, tenant, name)) or store.exists(f"{job_prefix(job_id)}/summary.json"):
        return {**state, "progress": 0.97, "stage": "saving"}
    epochs = _get_json(store, progress_key(job_id, tenant, name))
    if epochs is not None and epochs.get("epochs"):
        done = min(1.0, epochs["epoch"] / epochs["epochs"])
        return {**state, "progress": round(0.15 + 0.8 * done, 3),
                "stage": f"epoch {epochs['epoch']} of {epochs['epochs']}"}
    if store.exists(f"{job_prefix(job_id)}/job.json"):
        return {**state, "progress": 0.1, "stage": "the job started: loading the model"}
    return {**state, "progress": 0.05, "stage": "the job is waiting for the cluster"}


def unfinished_uploads(store: ArtifactStore, tenant: str) -> dict[str, str]:
    """name -> id of its upload not yet final (at most one per name: the service refuses a second)."""
    out = {}
    for name, ids in tenant_uploads(store, tenant).items():
        for upload_id in ids:
            if not store.exists(f"{upload_prefix(tenant, name, upload_id)}/result.json"):
                out[name] = upload_id
    return out


class ConceptBusy(RuntimeError):
    """A concept cannot be deleted now: a batch has its upload and the job may be writing it."""

    def __init__(self, tenant: str, name: str, upload_id: str):
        self.tenant, self.name, self.upload_id = tenant, name, upload_id
        super().__init__(f"concept {tenant}/{name} is training (upload {upload_id}); "
                         "delete it once it is ready or failed")


def discard_upload(store: ArtifactStore, tenant: str, name: str, upload_id: str) -> None:
    """Remove an upload no batch has claimed (a deleted concept), or raise `ConceptBusy`.

    The upload is claimed for no batch first (create-if-absent, the dispatcher's own primitive), so
    a dispatcher that looks at it meanwhile can no longer take it; a claim already there means a batch
    has it. Then the upload goes, its marker last: a marker without its upload is removed by the
    dispatcher, so nothing is lost half-way."""
    prefix = upload_prefix(tenant, name, upload_id)
    if not _put_json_if_absent(store, f"{prefix}/claim.json", {"discarded": True, "at": _now()}):
        claim = _get_json(store, f"{prefix}/claim.json")
        if claim is not None and not claim.get("discarded") and not store.exists(f"{prefix}/result.json"):
            raise ConceptBusy(tenant, name, upload_id)
    store.delete_prefix(prefix)
    store.delete_key(pending_key(upload_id))


# -- the job API ---------------------------------------------------------------------------------


class JobApiError(RuntimeError):
    """The job API did not answer as it should (unreachable, an HTTP error): try again later."""


class JobClient(Protocol):
    """What the dispatcher needs of Ray's job API (`RayJobs` wraps `JobSubmissionClient`)."""

    def submit(self, submission_id: str, entrypoint: str, runtime_env: dict | None, metadata: dict,
               num_cpus: float) -> None: ...

    def status(self, submission_id: str) -> tuple[str, str] | None:
        """(state, message) of a job, or None when the job API does not know it."""


class RayJobs:
    """`ray.job_submission.JobSubmissionClient`, the client `ray job submit` uses.

    `address`: the job API (`http://head:8265`); None: the Ray cluster this process runs in
    (or RAY_ADDRESS)."""

    def __init__(self, address: str | None = None):
        self.address = address
        self._client = None

    def _jobs(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except (ConnectionError, OSError, RuntimeError) as e:
                raise JobApiError(f"job API {self.address or '(this Ray cluster)'}: {e}") from e
        return self._client

    def submit(self, submission_id: str, entrypoint: str, runtime_env: dict | None, metadata: dict,
               num_cpus: float) -> None:
        try:
            self._jobs().submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                                    metadata=metadata, entrypoint_num_cpus=num_cpus)
        except (ConnectionError, OSError, RuntimeError) as e:  # requests' errors are OSErrors
            raise JobApiError(f"submitting job {submission_id}: {e}") from e

    def status(self, submission_id: str) -> tuple[str, str] | None:
        try:
            info = self._jobs().get_job_info(submission_id)
        except RuntimeError as e:
            if "status code 404" in str(e):  # the only way the SDK says "no such job"
                return None
            raise JobApiError(f"status of job {submission_id}: {e}") from e
        except (ConnectionError, OSError) as e:
            raise JobApiError(f"status of job {submission_id}: {e}") from e
        return str(getattr(info.status, "value", info.status)), info.message or ""


# -- the dispatcher ---------------------------------------------------------------------------------


class QueueConfig(BaseModel):
    """How uploads become jobs: when a batch is submitted, what it runs, how often it is retried."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_model: str = Field(description="the base model of the jobs: the chat service's model")
    recipe: dict[str, Any] = Field(default_factory=dict,
                                   description="RecipeConfig fields; `from: FILE` reads a recipe file first")
    negatives: str | list[str] | None = Field(None, description="negative pool: a folder, s3:// prefix or list")
    min_batch: int = Field(4, ge=1, description="submit a job as soon as this many subjects wait")
    max_wait_s: float = Field(30.0, ge=0, description="... or once the oldest has waited this long")
    max_batch: int = Field(64, ge=1, description="subjects in one job at most")
    max_active_jobs: int = Field(2, ge=1, description="jobs of this queue running at once; the rest wait")
    max_attempts: int = Field(3, ge=1, description="jobs per batch when jobs die without a summary")
    poll_s: float = Field(2.0, gt=0, description="how often the queue and its jobs are looked at")
    abandon_s: float = Field(900.0, gt=0, description="an upload not committed after this is removed")
    submit_deadline_s: float = Field(900.0, gt=0, description="an attempt the job API never accepted (down, "
                                     "or refusing the job) fails its batch after this long")
    job_api: str | None = Field(None, description="Ray job API address; None: the Ray cluster of the service")
    python: str | None = Field(None, description="the jobs' Python (default: the service's own interpreter)")
    workers: int = Field(1, ge=1)
    pack_size: int = Field(8, ge=1)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, ge=0)
    entrypoint_cpus: float = Field(0, ge=0, description="CPUs reserved for the job's driver")
    policy: str | None = Field(None, description="owner policy for the jobs (--policy)")
    runtime_env: dict[str, Any] | None = Field(None, description="the jobs' Ray runtime_env (env_vars...)")

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, value: dict) -> dict:
        if "from" in value:  # resolved here, so the request carries every field the job will use
            rest = {k: v for k, v in value.items() if k != "from"}
            value = {**RecipeConfig.from_file(Path(value["from"])).to_dict(), **rest}
        RecipeConfig.from_dict(value)
        return value


@dataclass
class TickReport:
    """What one look at the queue did (for logs and tests)."""

    submitted: list[str] = field(default_factory=list)  # job ids
    finished: list[str] = field(default_factory=list)  # upload ids made final
    batches: list[str] = field(default_factory=list)  # batches formed
    removed: list[str] = field(default_factory=list)  # abandoned or deleted uploads
    errors: list[str] = field(default_factory=list)  # job API errors (retried next tick)


@dataclass
class _Pending:
    upload_id: str
    tenant: str
    name: str
    created: float
    upload: Upload | None = None
    claim: str | None = None
    final: bool = False


class Dispatcher:
    """Looks at the queue and its jobs (`tick`), from the store alone; safe to restart at any point."""

    def __init__(self, store: ArtifactStore, jobs: JobClient, config: QueueConfig,
                 clock: Callable[[], float] = time.time, env: dict[str, str] | None = None):
        self.store, self.jobs, self.config, self.clock = store, jobs, config, clock
        self.env = env or {}  # environment variables for the jobs (e.g. the S3 endpoint)
        # Written once and never changed: safe to remember. A deleted upload's document stays here; what
        # must know whether it still exists (before a job is asked for) reads the store.
        self._docs: dict[str, Upload] = {}
        self._claims: dict[str, str] = {}

    def _upload(self, tenant: str, name: str, upload_id: str) -> Upload | None:
        if upload_id not in self._docs:
            doc = _get_json(self.store, f"{upload_prefix(tenant, name, upload_id)}/upload.json")
            if doc is None:
                return None
            self._docs[upload_id] = Upload.from_doc(doc)
        return self._docs[upload_id]

    def _claim(self, tenant: str, name: str, upload_id: str) -> str | None:
        if upload_id not in self._claims:
            claim = _get_json(self.store, f"{upload_prefix(tenant, name, upload_id)}/claim.json")
            if claim is None or claim.get("discarded"):  # being deleted: no batch has it, none will
                return None
            self._claims[upload_id] = check_batch_id(claim["batch"])
        return self._claims[upload_id]

    # -- one look

    def tick(self) -> TickReport:
        report = TickReport()
        pending = self._pending(report)
        active = sorted({p.claim for p in pending if p.claim is not None and not p.final})
        running = 0
        for batch in active:
            try:
                if not self._advance(batch, report):
                    running += 1
            except JobApiError as e:
                log.warning("batch %s: %s (retried at the next look)", batch, e)
                report.errors.append(str(e))
                running += 1
            except ObjectNotFound as e:  # its document was removed by hand: nothing to follow, say so
                log.error("batch %s: %s; its uploads stay in training until an operator removes them", batch, e)
                report.errors.append(str(e))
        busy = {(p.tenant, p.name) for p in pending if p.claim is not None and not p.final}
        waiting = [p for p in pending if p.upload is not None and p.claim is None and not p.final]
        if running < self.config.max_active_jobs and self._due(waiting):
            waiting = self._outside_policy(waiting, report)
        while running < self.config.max_active_jobs and self._due(waiting):
            chosen, seen = [], set(busy)
            for p in waiting:
                if (p.tenant, p.name) not in seen and len(chosen) < self.config.max_batch:
                    chosen.append(p)
                    seen.add((p.tenant, p.name))
            if not chosen:
                break
            waiting = [p for p in waiting if p not in chosen]
            busy |= {(p.tenant, p.name) for p in chosen}
            batch = self._form(chosen, report)
            if batch is None:
                continue
            running += 1
            try:
                self._advance(batch, report)
            except JobApiError as e:
                log.warning("batch %s: %s (retried at the next look)", batch, e)
                report.errors.append(str(e))
        return report

    def _outside_policy(self, waiting: list[_Pending], report: TickReport) -> list[_Pending]:
        """Uploads the owner policy the jobs will read does not allow fail here, alone: in a job, one
        owner's refusal refuses the whole request, every other tenant's subjects with it."""
        try:
            policy = load_policy(self.config.policy, self.store)
        except PolicyError as e:  # the jobs would refuse every request too: nothing is batched until fixed
            log.error("upload queue: the owner policy cannot be read (%s); no batch until it is fixed", e)
            report.errors.append(str(e))
            return []
        if policy is None:
            return waiting
        kept = []
        for p in waiting:
            photos = self.object_uri(f"{upload_prefix(p.tenant, p.name, p.upload_id)}/photos")
            if policy.allows(p.tenant, photos):
                kept.append(p)
                continue
            log.error("upload %s of %s/%s: the owner policy does not allow %s for owner %r; operator: add the "
                      "tenant's uploads prefix to the policy", p.upload_id, p.tenant, p.name, photos, p.tenant)
            self._result({"id": p.upload_id, "tenant": p.tenant, "name": p.name},
                         {"status": FAILED, "reason": "the service's owner policy does not allow training on "
                          "your uploads; ask its operator"}, report)
        return kept

    def _due(self, waiting: list[_Pending]) -> bool:
        if not waiting:
            return False
        oldest = min(p.created for p in waiting)
        return len(waiting) >= self.config.min_batch or self.clock() - oldest >= self.config.max_wait_s

    def _pending(self, report: TickReport) -> list[_Pending]:
        """Every unfinished upload, oldest first; markers of final or abandoned uploads are removed."""
        out = []
        for key in self.store.list_prefix(f"{QUEUE}/pending"):
            upload_id = key.rsplit("/", 1)[1].removesuffix(".json")
            if not UPLOAD_ID_RE.fullmatch(upload_id):
                log.warning("queue: ignoring %s (not an upload id)", key)
                continue
            marker = _get_json(self.store, key)
            if marker is None:
                continue
            p = _Pending(upload_id, check_name(marker["tenant"], "tenant"), check_name(marker["name"], "name"),
                         float(marker["created"]))
            prefix = upload_prefix(p.tenant, p.name, upload_id)
            p.upload = self._upload(p.tenant, p.name, upload_id)
            if p.upload is None:
                if self.clock() - p.created >= self.config.abandon_s:  # its writer died before the commit
                    discard_upload(self.store, p.tenant, p.name, upload_id)
                    report.removed.append(upload_id)
                continue
            if self.store.exists(f"{prefix}/result.json"):
                self._tidy(p.upload)  # final, but the dispatcher died before removing the marker
                continue
            p.claim = self._claim(p.tenant, p.name, upload_id)
            out.append(p)
        return sorted(out, key=lambda p: p.upload_id)

    # -- batches

    def _form(self, chosen: list[_Pending], report: TickReport) -> str | None:
        """A new batch of `chosen`: its document, then a claim on each upload (create-if-absent)."""
        batch = _new_id("b")
        prefix = batch_prefix(batch)
        members = [{"id": p.upload_id, "tenant": p.tenant, "name": p.name} for p in chosen]
        if not _put_json_if_absent(self.store, f"{prefix}/batch.json", {"id": batch, "uploads": members,
                                                                        "created": _now()}):
            raise RuntimeError(f"batch id {batch} was already used")  # uuid4: a collision means a bug
        claimed = 0
        for p in chosen:
            key = f"{upload_prefix(p.tenant, p.name, p.upload_id)}/claim.json"
            if _put_json_if_absent(self.store, key, {"batch": batch, "at": _now()}):
                claimed += 1
        report.batches.append(batch)
        if not claimed:  # another dispatcher claimed them all first
            _put_json_if_absent(self.store, f"{prefix}/done.json", {"finished": _now(), "members": 0})
            return None
        log.info("queue: batch %s of %d subject(s)", batch, claimed)
        return batch

    def members(self, batch: str) -> list[dict]:
        """The uploads of a batch: those of its document whose claim names it."""
        doc = self.store.get_json(f"{batch_prefix(batch)}/batch.json")
        return [m for m in doc["uploads"] if self._claim(m["tenant"], m["name"], m["id"]) == batch]

    def _advance(self, batch: str, report: TickReport) -> bool:
        """Move a batch on: submit, follow its job, finish it. True when the batch is over."""
        prefix = batch_prefix(batch)
        members = self.members(batch)
        open_ = [m for m in members
                 if not self.store.exists(f"{upload_prefix(m['tenant'], m['name'], m['id'])}/result.json")]
        if not open_:
            _put_json_if_absent(self.store, f"{prefix}/done.json", {"finished": _now(), "members": len(members)})
            return True
        request_key = f"{prefix}/request.json"
        if not self.store.exists(request_key):
            gone = [m for m in open_ if not self.store.exists(
                f"{upload_prefix(m['tenant'], m['name'], m['id'])}/upload.json")]
            for m in gone:  # deleted before its job was asked for
                self._result(m, {"status": FAILED, "reason": "deleted"}, report)
            open_ = [m for m in open_ if m not in gone]
            if not open_:
                _put_json_if_absent(self.store, f"{prefix}/done.json", {"finished": _now(), "members": 0})
                return True
            self.store.put_json(request_key, self._request(open_))  # the same document whoever writes it
        attempts = _attempts(self.store, batch)
        if not attempts:
            self._submit(batch, 1, report)
            return False
        n = attempts[-1]
        job_id = attempt_job_id(batch, n)
        state = self.jobs.status(job_id)
        summary = _get_json(self.store, f"{job_prefix(job_id)}/summary.json")
        if state is not None and state[0] in JOB_ACTIVE:
            return False
        if summary is not None:
            self._finish(batch, job_id, open_, summary, report)
            return True
        if state is None and not self.store.list_prefix(job_prefix(job_id)):
            # Ray does not know it and it never started (the submission was lost or refused): submit it
            # again, until the attempt is older than submit_deadline_s; then its members fail, said so.
            record = _get_json(self.store, f"{prefix}/attempts/{n}.json") or {}
            waited = self.clock() - float(record.get("t", self.clock()))
            if waited > self.config.submit_deadline_s:
                log.error("batch %s: job %s not accepted by the job API in %.0f s; its members fail",
                          batch, job_id, waited)
                for m in open_:
                    self._result(m, {"status": FAILED, "job_id": job_id, "reason": "training could not start: the "
                                     f"cluster did not accept its job in {waited:.0f} s"}, report)
                _put_json_if_absent(self.store, f"{prefix}/done.json", {"finished": _now(), "members": len(members)})
                return True
            self._submit(batch, n, report, again=True)
            return False
        # Ray's message holds the job's log, with other tenants' subjects: for the operator's log only.
        why = (f"job {job_id} ended {state[0]} without a summary" if state is not None
               else f"job {job_id} started but the job API no longer knows it (the Ray cluster restarted?)")
        log.warning("batch %s: %s (%s)", batch, why, state[1] if state is not None else "")
        if n < self.config.max_attempts:
            log.warning("batch %s: attempt %d of %d", batch, n + 1, self.config.max_attempts)
            self._submit(batch, n + 1, report)
            return False
        for m in open_:
            self._result(m, {"status": FAILED, "reason": f"training did not finish after {n} attempt(s): {why}",
                             "job_id": job_id}, report)
        _put_json_if_absent(self.store, f"{prefix}/done.json", {"finished": _now(), "members": len(members)})
        return True

    def _request(self, members: list[dict]) -> dict:
        cfg = self.config
        subjects = []
        for m in members:
            upload = self._upload(m["tenant"], m["name"], m["id"])
            entry = {"owner": m["tenant"], "name": m["name"], "photos": self.object_uri(f"{upload.prefix}/photos")}
            if upload.description:
                entry["description"] = upload.description
            subjects.append(entry)
        request = {"base_model": cfg.base_model, "store": self.store.uri, "recipe": cfg.recipe, "subjects": subjects}
        if cfg.negatives is not None:
            request["negatives"] = cfg.negatives
        return request

    def object_uri(self, key: str) -> str:
        """Where a job finds a key of this store: a local path (file store) or an s3:// URI."""
        if isinstance(self.store, FileStore):
            return str(self.store.root.joinpath(*key.split("/")))
        return f"{self.store.uri.rstrip('/')}/{key}"

    def entrypoint(self, batch: str, job_id: str) -> str:
        cfg = self.config
        args = [cfg.python or sys.executable, "-m", "cluster.personalize",
                self.object_uri(f"{batch_prefix(batch)}/request.json"), "--job-id", job_id, "--no-progress",
                "--workers", str(cfg.workers), "--pack-size", str(cfg.pack_size),
                "--gpus-per-worker", str(cfg.gpus_per_worker), "--cpus-per-worker", str(cfg.cpus_per_worker)]
        if cfg.policy:
            args += ["--policy", cfg.policy]
        return shlex.join(args)

    def _submit(self, batch: str, n: int, report: TickReport, again: bool = False) -> None:
        job_id = attempt_job_id(batch, n)
        record = {"attempt": n, "job_id": job_id, "at": _now(), "t": self.clock()}
        if not again and not _put_json_if_absent(self.store, f"{batch_prefix(batch)}/attempts/{n}.json", record):
            return  # another dispatcher is submitting this attempt
        runtime_env = dict(self.config.runtime_env or {})
        if self.env:
            runtime_env["env_vars"] = {**self.env, **runtime_env.get("env_vars", {})}
        self.jobs.submit(job_id, self.entrypoint(batch, job_id), runtime_env or None,
                         {"yollava_batch": batch, "attempt": str(n)}, self.config.entrypoint_cpus)
        log.info("queue: batch %s submitted as job %s", batch, job_id)
        report.submitted.append(job_id)

    def _finish(self, batch: str, job_id: str, open_: list[dict], summary: dict, report: TickReport) -> None:
        rows = {(r["owner"], r["name"]): r for r in summary.get("subjects", [])}
        for m in open_:
            row = rows.get((m["tenant"], m["name"]))
            if row is not None and row["status"] in ("trained", "done-before"):
                result = {"status": READY, "version": row["version"], "metrics": row.get("metrics") or {},
                          "job_id": job_id, "trained": row["status"] == "trained"}
            elif row is not None and row["status"] == "invalid":  # its own photos: the reason is its own
                photos = self.object_uri(f"{upload_prefix(m['tenant'], m['name'], m['id'])}/photos") + "/"
                result = {"status": FAILED, "reason": row.get("reason", "invalid").replace(photos, ""),
                          "job_id": job_id}
            else:  # a job-wide error may name other tenants' subjects: logged, not shown
                log.warning("job %s: %s/%s failed: %s", job_id, m["tenant"], m["name"],
                            (row or {}).get("reason") or summary.get("error"))
                result = {"status": FAILED, "reason": f"training failed in job {job_id}", "job_id": job_id}
            self._result(m, result, report)
        _put_json_if_absent(self.store, f"{batch_prefix(batch)}/done.json", {"finished": _now(), "job_id": job_id})

    def _result(self, m: dict, result: dict, report: TickReport) -> None:
        prefix = upload_prefix(m["tenant"], m["name"], m["id"])
        upload = self._upload(m["tenant"], m["name"], m["id"])
        if upload is not None and not self.store.exists(f"{prefix}/upload.json"):
            upload = None
        if upload is None:  # the concept was deleted while its job ran: what the job wrote goes too
            if result["status"] == READY and result.get("trained"):
                self.store.delete_concept(m["tenant"], m["name"], result["version"])
                self.store.delete_key(subject_record_key(result["job_id"], m["tenant"], m["name"]))
            self.store.delete_key(pending_key(m["id"]))
            report.removed.append(m["id"])
            return
        _put_json_if_absent(self.store, f"{prefix}/result.json", {**result, "finished": _now()})
        self._tidy(upload)
        report.finished.append(m["id"])

    def _tidy(self, upload: Upload) -> None:
        """After a result: the photos go (the concept is trained, or failed and will be uploaded again),
        so do earlier final uploads of the concept; the pending marker last."""
        self.store.delete_prefix(f"{upload.prefix}/photos")
        concept = uploads_prefix(upload.tenant, upload.name)
        for older in _upload_ids(self.store.list_prefix(concept), concept):
            prefix = upload_prefix(upload.tenant, upload.name, older)
            if older < upload.id and self.store.exists(f"{prefix}/result.json"):
                self.store.delete_prefix(prefix)
        self.store.delete_key(pending_key(upload.id))


def _attempts(store: ArtifactStore, batch: str) -> list[int]:
    prefix = f"{batch_prefix(batch)}/attempts"
    found = []
    for k in store.list_prefix(prefix):
        stem = k.rsplit("/", 1)[1].removesuffix(".json")
        if stem.isdigit():
            found.append(int(stem))
    return sorted(found)
