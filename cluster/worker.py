"""The Ray Train worker: load the frozen backbone once, then train packs of subjects.

`train_func(config)` is what `TorchTrainer` runs on every worker. Rank r
trains packs r, r+W, ... (one `ray.train.report` per round, since a report is
a barrier across workers). Under DeepSpeed ZeRO-3 the backbone is sharded
across the workers, so every rank runs every pack in lockstep on the same
data (their forward passes gather the shards together) and rank 0 writes.

Exactly once, across restarts: before a subject is trained its done-marker is
checked (it counts only while the version it names exists and holds this
subject key), and so is the newest complete version in the store (a worker
killed after the manifest but before the marker left it there). Artifacts are
written claim, tensors, manifest last (`ArtifactStore.put_concept`), so a
killed writer leaves nothing a reader can load, and a version number it had
claimed is never given to another writer.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from cluster.keys import done_key, progress_key, subject_record_key
from cluster.negatives import PoolInfo, load_index
from cluster.packing import packs_of_rank
from cluster.store import ArtifactStore, ConceptNotFound, ObjectNotFound, access_errors, open_store
from yollava.backbone import Backbone, load_backbone
from yollava.mining import VisionTowerEncoder
from yollava.pipeline import SubjectSpec, build_sets, to_artifact
from yollava.pool import NegativePool
from yollava.recipe import RecipeConfig, TrainingSet
from yollava.trainer import ConceptBank, PackedTrainer

log = logging.getLogger(__name__)


@dataclass
class SubjectTask:
    """One subject to train: identity, content key, and its photos as Ray object refs (bytes)."""

    owner: str
    name: str
    key: str
    photo_sha256: list[str]
    photo_refs: list[Any]  # Ray ObjectRefs of the bytes (plain bytes in a --local run)
    description: str | None = None

    @property
    def label(self) -> str:
        return f"{self.owner}/{self.name}"

    def photo_keys(self) -> list[str]:
        """Loader keys, scoped by owner and name so no two subjects' photos share a key."""
        return [f"{self.owner}/{self.name}/{h}" for h in self.photo_sha256]


@dataclass
class JobConfig:
    """Everything a worker needs; pickled by Ray Train into every worker."""

    job_id: str
    store_uri: str
    model_id: str
    fingerprint: str
    recipe: dict
    packs: list[list[SubjectTask]]
    pool: PoolInfo | None = None
    pool_refs: dict[str, Any] = field(default_factory=dict)  # pool id (sha256) -> ref to bytes
    force: bool = False
    deepspeed: dict | None = None
    dtype: str | None = None
    progress: bool = False
    store_options: dict = field(default_factory=dict)  # e.g. endpoint_url

    def open_store(self) -> ArtifactStore:
        # The URI travels, not the store object: boto3's TransferConfig does not survive pickling.
        return open_store(self.store_uri, **self.store_options)


# -- the Ray Train entry point ----------------------------------------------------------------


def train_func(config: dict) -> None:
    import ray.train

    job: JobConfig = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t0 = time.perf_counter()
    # Under ZeRO-3 the whole model is loaded in host memory and only shards go to the accelerator.
    device = "cuda" if torch.cuda.is_available() and not job.deepspeed else "cpu"
    backbone = load_backbone(job.model_id, dtype=job.dtype, device=device)
    if backbone.fingerprint != job.fingerprint:
        raise RuntimeError(f"worker {rank} loaded {job.model_id} with fingerprint {backbone.fingerprint}, "
                           f"the job was planned for {job.fingerprint}")
    runner = PackRunner(job, backbone, rank, world)
    log.info("worker %d/%d: backbone %s ready in %.1fs", rank, world, job.model_id, time.perf_counter() - t0)
    mine = list(job.packs) if job.deepspeed else packs_of_rank(job.packs, rank, world)
    for round_, pack in enumerate(mine):
        metrics = runner.run(pack) if pack else {}
        ray.train.report({"round": round_, "rank": rank, "subjects": metrics})


class PackRunner:
    """Trains packs on one loaded backbone and writes their artifacts, markers and records."""

    def __init__(self, job: JobConfig, backbone: Backbone, rank: int = 0, world: int = 1):
        self.job, self.rank, self.world = job, rank, world
        self.config = RecipeConfig.from_dict(job.recipe)
        self.store = job.open_store()
        self.encoder = VisionTowerEncoder(backbone) if job.pool else None  # before sharding: name reads nothing
        self.bank_init = ConceptBank.init_stats(backbone)  # before sharding: ZeRO-3 empties the weights
        self.backbone = shard_backbone(backbone, job.deepspeed) if job.deepspeed else backbone
        self.bank_init = tuple(x.to(self.backbone.device) for x in self.bank_init)
        self.local_elements = local_elements(self.backbone.model)
        self.pool = None
        if job.pool:
            index = load_index(self.store, job.pool.key, job.pool.encoder)
            self.pool = NegativePool(list(index.ids), index, self.encoder)
        self.writer = rank == 0 or not job.deepspeed

    def run(self, pack: list[SubjectTask]) -> dict[str, dict]:
        """Train the not-yet-done subjects of a pack; per-subject metrics of this round."""
        out, todo = {}, []
        for t in pack:
            done = self.already_done(t)
            if done is None:
                todo.append(t)
            else:
                out[t.label] = self._skipped(t, done)
        todo = self._sync(todo)
        if todo:
            out.update(self._train(todo))
        return out

    def _train(self, todo: list[SubjectTask]) -> dict[str, dict]:
        t0 = time.perf_counter()
        loader = RefLoader(self.job.pool_refs)
        sets, failed = [], {}
        for t in todo:
            loader.add(t.photo_keys(), t.photo_refs)
            try:
                spec = SubjectSpec(t.name, t.photo_keys(), t.owner, t.description)
                (ts,) = build_sets(self.backbone, [spec], loader, self.pool or NegativePool(), self.config)
                check_private(ts, t, self.pool.ids if self.pool else [])  # before it joins the pack
                sets.append(ts)
            except SUBJECT_ERRORS as e:  # one subject's failure is its own; a bug fails the job
                log.exception("subject %s: could not build its training set", t.label)
                failed[t.label] = f"{type(e).__name__}: {e}"
        by_name = {ts.subject: ts for ts in sets}
        results = {}
        if sets:
            trainer = PackedTrainer(self.backbone, self.config, loader, progress=self.job.progress)
            bank = ConceptBank.from_stats(self.bank_init, seed=self.config.seed)
            training = [t for t in todo if t.label not in failed]
            results = trainer.fit(sets, bank=bank, on_epoch=lambda epoch, _: self._progress(training, epoch))
        seconds = (time.perf_counter() - t0) / len(todo)
        out = {}
        for t in todo:
            if t.label in failed:
                out[t.label] = self._record(t, "failed", seconds, reason=failed[t.label])
            else:
                out[t.label] = self._write(t, results[t.name], by_name[t.name], seconds)
        return out

    def _progress(self, todo: list[SubjectTask], epoch: int) -> None:
        """After each epoch: `jobs/<id>/progress/<owner>/<name>.json` (what a status page shows)."""
        if self.writer:
            for t in todo:
                try:
                    self.store.put_json(progress_key(self.job.job_id, t.owner, t.name),
                                        {"epoch": epoch, "epochs": self.config.epochs})
                except (OSError, *access_errors()) as e:  # only the status page's figure is late: go on
                    log.warning("subject %s: progress after epoch %d not written: %r", t.label, epoch, e)

    # -- exactly once ------------------------------------------------------------------------

    def already_done(self, t: SubjectTask) -> dict | None:
        """The done-marker of this key (this job's, under --force), or of a finished but unmarked version."""
        found = read_done_marker(self.store, t.owner, t.name, t.key)
        if found is not None and (not self.job.force or found.get("job_id") == self.job.job_id):
            return found
        try:
            art = self.store.get_concept(t.owner, t.name)
        except ConceptNotFound:
            return None
        if art.metrics.get("subject_key") != t.key or (self.job.force and art.metrics.get("job_id") != self.job.job_id):
            return None
        # Killed between manifest and marker: the version is complete, finish the bookkeeping.
        found = self._mark(t, art.version, art.metrics, seconds=None)
        found["metrics"] = _public(art.metrics)
        return found

    def _skipped(self, t: SubjectTask, done: dict) -> dict:
        """A subject found done: trained earlier in this job (before a restart) or by another job."""
        record_key = subject_record_key(self.job.job_id, t.owner, t.name)
        if self.writer and self.store.exists(record_key):
            return self.store.get_json(record_key)
        status = "trained" if done.get("job_id") == self.job.job_id else "done-before"
        return self._record(t, status, done.get("seconds"), version=done["version"],
                            metrics=done.get("metrics", {}), recovered=True)

    def _sync(self, todo: list[SubjectTask]) -> list[SubjectTask]:
        """Under ZeRO-3 every rank must train the same subjects: rank 0 decides."""
        if not self.job.deepspeed or self.world == 1:
            return todo
        import torch.distributed as dist

        box = [todo if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- writing -----------------------------------------------------------------------------

    def _write(self, t: SubjectTask, result, ts: TrainingSet, seconds: float) -> dict:
        spec = SubjectSpec(t.name, t.photo_keys(), t.owner, t.description)
        artifact = to_artifact(result, spec, self.backbone, self.config)
        artifact.metrics.update(subject_key=t.key, job_id=self.job.job_id)
        if not self.writer:
            return {**_public(result.metrics), "status": "trained"}
        version = self.store.put_concept(artifact)  # claim, tensors, manifest last
        self._mark(t, version, artifact.metrics, seconds)
        return self._record(t, "trained", seconds, version=version, metrics=_public(result.metrics),
                            usage=photo_usage(ts, t))

    def _mark(self, t: SubjectTask, version: int, metrics: dict, seconds: float | None) -> dict:
        marker = {"owner": t.owner, "name": t.name, "key": t.key, "version": version,
                  "job_id": metrics.get("job_id", self.job.job_id), "seconds": seconds}
        if self.writer:
            self.store.put_json(done_key(t.owner, t.name, t.key), marker)
        return marker

    def _record(self, t: SubjectTask, status: str, seconds: float | None, **extra) -> dict:
        record = {"owner": t.owner, "name": t.name, "key": t.key, "status": status, "seconds": seconds,
                  "worker": {"rank": self.rank, "world": self.world, "zero3": bool(self.job.deepspeed),
                             "local_backbone_elements": self.local_elements}, **extra}
        if self.writer:
            self.store.put_json(subject_record_key(self.job.job_id, t.owner, t.name), record)
        return {k: v for k, v in record.items() if k != "usage"}


def read_done_marker(store: ArtifactStore, owner: str, name: str, key: str) -> dict | None:
    """The done-marker of a subject key, if the version it names still exists and was made from this key.

    A marker outlives its version when the version is deleted (one version by
    an operator, or a whole concept by code that did not forget its markers):
    such a marker never makes a subject skip training.
    """
    try:
        marker = store.get_json(done_key(owner, name, key))
    except ObjectNotFound:
        return None
    version = marker.get("version")
    manifest = store.read_manifest(owner, name, version) if isinstance(version, int) and version >= 1 else None
    if manifest is None or (manifest.get("metrics") or {}).get("subject_key") != key:
        log.info("subject %s/%s: its done-marker names version %r, which no longer holds this key: "
                 "not done", owner, name, version)
        return None
    return marker


def _public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# -- photos by reference ----------------------------------------------------------------------


class RefLoader:
    """`load_image` for workers: keys -> bytes from Ray's object store, decoded once per pack."""

    def __init__(self, pool_refs: dict[str, Any]):
        self.refs = dict(pool_refs)
        self.images: dict[str, Image.Image] = {}

    def add(self, keys: list[str], refs: list[Any]) -> None:
        self.refs.update(zip(keys, refs))

    def __call__(self, key: str) -> Image.Image:
        if key not in self.images:
            data = self.refs[key]
            if not isinstance(data, bytes):  # a Ray ObjectRef; plain bytes in a --local run
                import ray

                data = ray.get(data)
            self.images[key] = Image.open(io.BytesIO(data)).convert("RGB")
        return self.images[key]


# -- privacy ------------------------------------------------------------------------------------


class PrivacyError(RuntimeError):
    """A subject's training set holds a photo that is neither its own nor the pool's."""


def check_private(ts: TrainingSet, t: SubjectTask, pool_ids: list[str]) -> None:
    """Every photo a subject trains on is its own or from the shared pool; never another subject's."""
    own, pool = set(t.photo_keys()), set(pool_ids)
    for s in ts.train + ts.holdout:
        if s.photo is not None and s.photo.key not in own and s.photo.key not in pool:
            raise PrivacyError(f"subject {t.label}: training photo {s.photo.key!r} is neither its own "
                               "nor from the negative pool")


# What building one subject's training set can fail with that is that subject's problem: its
# photos (unreadable, undecodable), its recipe-level checks (ValueError), the privacy guard.
SUBJECT_ERRORS = (ValueError, OSError, UnidentifiedImageError, PrivacyError)


def photo_usage(ts: TrainingSet, t: SubjectTask) -> dict[str, list[str]]:
    """sha256 of every photo the subject trained on, by role (for the job record and audits)."""
    own = dict(zip(t.photo_keys(), t.photo_sha256))
    used: dict[str, set[str]] = {"positive": set(), "negative": set()}
    for s in ts.train + ts.holdout:
        if s.photo is not None:
            used["positive" if s.kind == "positive" else "negative"].add(own.get(s.photo.key, s.photo.key))
    return {k: sorted(v) for k, v in used.items()}


# -- DeepSpeed ZeRO-3 ---------------------------------------------------------------------------


@dataclass
class ShardedBackbone(Backbone):
    """A backbone whose weights ZeRO-3 partitioned: sizes are remembered, not read from the weights."""

    shape: tuple[int, int] = (0, 0)  # (vocab_size, hidden_size)
    compute_device: str = "cpu"  # where the gathered layers run (the accelerator of this rank)

    @property
    def vocab_size(self) -> int:
        return self.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return torch.device(self.compute_device)


def local_elements(model: torch.nn.Module) -> int:
    """Weight elements this process holds: all of them, or its ZeRO-3 partition."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def deepspeed_config(config: dict) -> dict:
    """The user's DeepSpeed config, made complete for a frozen model sharded with ZeRO-3."""
    cfg = dict(config)
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"--deepspeed config: zero_optimization.stage={stage!r}; this job shards "
                         "the frozen backbone and needs stage 3")
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    cfg.setdefault("gradient_accumulation_steps", 1)
    return cfg


def shard_backbone(backbone: Backbone, config: dict) -> ShardedBackbone:
    """Partition the frozen backbone's weights across the workers' process group with ZeRO-3.

    The concept bank is not part of the engine: it stays a full fp32 copy on
    every rank (kilobytes) and is optimised by the packed trainer as usual;
    ZeRO-3's hooks gather each frozen layer for its forward and backward.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    shape = (backbone.vocab_size, backbone.hidden_size)
    deepspeed.initialize(model=backbone.model, config=deepspeed_config(config), dist_init_required=False)
    return ShardedBackbone(backbone.model_id, backbone.model, backbone.tokenizer, backbone.image_processor,
                           backbone.fingerprint, shape=shape, compute_device=get_accelerator().current_device_name())
