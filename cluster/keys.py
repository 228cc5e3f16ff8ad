"""Content keys and store layout of a job: what makes a subject "already trained".

A subject's key is the sha256 of everything its training depends on: its
photos' contents (sorted, so order and file names do not matter), the full
recipe, the base model's weight fingerprint, the negative pool's content key
and its owner/name. The same request resubmitted gives the same keys, and a
key with a done-marker is not trained again.

Layout under the store root (next to `concepts/`, which `store.py` owns)::

    done/<owner>/<name>/<key>.json      the version a key produced (written after the manifest;
                                        it counts only while that version exists with this key)
    indexes/<pool key>/index.faiss      negative-pool index, then ids.json (manifest last)
    jobs/<job id>/job.json              the job id's claim (a reused id is refused)
    jobs/<job id>/summary.json          the job summary
    jobs/<job id>/subjects/<owner>/<name>.json   per-subject record (status, metrics, negatives used)
    jobs/<job id>/progress/<owner>/<name>.json   epochs done so far (for the upload API's progress)
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

from yollava.tokens import check_name


def subject_key(owner: str, name: str, photo_sha256: Iterable[str], recipe: dict, base_fingerprint: str,
                pool_key: str | None) -> str:
    body = {"owner": check_name(owner, "owner"), "name": check_name(name, "name"),
            "photos": sorted(set(photo_sha256)), "recipe": recipe, "base": base_fingerprint,
            "pool": pool_key or ""}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def done_key(owner: str, name: str, key: str) -> str:
    return f"done/{check_name(owner, 'owner')}/{check_name(name, 'name')}/{_hex(key)}.json"


def done_prefix(owner: str, name: str) -> str:
    return f"done/{check_name(owner, 'owner')}/{check_name(name, 'name')}"


def index_prefix(pool_key: str) -> str:
    return f"indexes/{_hex(pool_key.removeprefix('sha256:'))}"


def job_prefix(job_id: str) -> str:
    return f"jobs/{check_name(job_id, 'job_id')}"


def subject_record_key(job_id: str, owner: str, name: str) -> str:
    return f"{job_prefix(job_id)}/subjects/{check_name(owner, 'owner')}/{check_name(name, 'name')}.json"


def progress_key(job_id: str, owner: str, name: str) -> str:
    """How far training of a subject got in a job: {epoch, epochs}, rewritten after each epoch."""
    return f"{job_prefix(job_id)}/progress/{check_name(owner, 'owner')}/{check_name(name, 'name')}.json"


def _hex(value: str) -> str:
    if not value or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"key={value!r} is not a lower-case hex digest")
    return value
