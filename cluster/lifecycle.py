"""Forgetting a concept: what deleting one must delete besides its versions.

A concept leaves traces outside `concepts/<owner>/<name>/`: grants to other
tenants, done-markers (which would make a resubmission skip training),
per-subject job records (which list the sha256 of every photo it trained on),
and its uploads (the photos tenants sent through the chat API) with their queue entries.
`forget_concept` removes them all, grants first so that no one else can use
the concept while the rest goes, and redacts the concept's rows in job
summaries. The chat API's `DELETE /v1/concepts/{name}` and `cluster.ops
concepts rm OWNER/NAME` both call it.
"""

from __future__ import annotations

from cluster.keys import done_prefix, job_prefix, progress_key, subject_record_key
from cluster.queue import UPLOAD_ID_RE, discard_upload, pending_key, unfinished_uploads, uploads_prefix
from cluster.shares import Grants
from cluster.store_base import ArtifactStore, ObjectNotFound
from yollava.tokens import check_name

_KEPT_IN_SUMMARY = ("owner", "name")


def forget_concept(store: ArtifactStore, owner: str, name: str) -> dict:
    """Delete owner/name and its grants, markers and job records; returns what was deleted.

    Raises `ConceptBusy` (and deletes nothing) while a batch has the concept's upload: its job may be
    writing a version, which only the dispatcher can then clean up. A queued upload is discarded
    first, so no batch can take it while the rest goes."""
    check_name(owner, "owner")
    check_name(name, "name")
    unfinished = unfinished_uploads(store, owner).get(name)
    if unfinished is not None:
        discard_upload(store, owner, name, unfinished)  # ConceptBusy if a batch has it
    grants = Grants(store).drop(owner, name)
    versions = store.delete_concept(owner, name)
    markers = store.delete_prefix(done_prefix(owner, name))
    uploads = _forget_uploads(store, owner, name)
    records = summaries = 0
    keys = store.list_prefix("jobs")
    for job_id in sorted({k.split("/")[1] for k in keys}):
        record = subject_record_key(job_id, owner, name)
        if record in keys:
            store.delete_key(record)
            records += 1
        if progress_key(job_id, owner, name) in keys:
            store.delete_key(progress_key(job_id, owner, name))
        summary = f"{job_prefix(job_id)}/summary.json"
        if summary in keys and _redact_summary(store, summary, owner, name):
            summaries += 1
    return {"owner": owner, "name": name, "versions": versions, "grants": grants, "markers": markers,
            "uploads": uploads + (unfinished is not None), "records": records, "summaries": summaries}


def _forget_uploads(store: ArtifactStore, owner: str, name: str) -> int:
    """The concept's uploads (photos, records) and their places in the queue; returns how many."""
    prefix = uploads_prefix(owner, name)
    ids = sorted({k[len(prefix) + 1:].split("/")[0] for k in store.list_prefix(prefix)})
    ids = [i for i in ids if UPLOAD_ID_RE.fullmatch(i)]
    store.delete_prefix(prefix)
    for upload_id in ids:  # markers last: a marker without its upload is removed by the dispatcher
        store.delete_key(pending_key(upload_id))
    return len(ids)


def _redact_summary(store: ArtifactStore, key: str, owner: str, name: str) -> bool:
    try:
        summary = store.get_json(key)
    except ObjectNotFound:
        return False
    changed = False
    rows = summary.get("subjects", [])
    for i, row in enumerate(rows):
        if row.get("owner") == owner and row.get("name") == name and row.get("status") != "deleted":
            rows[i] = {**{k: row[k] for k in _KEPT_IN_SUMMARY}, "status": "deleted"}
            changed = True
    if changed:
        store.put_json(key, summary)
    return changed
