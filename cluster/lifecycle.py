"""Forgetting a concept: what deleting one must delete besides its versions.

A concept leaves traces outside `concepts/<owner>/<name>/`: grants to other
tenants, done-markers (which would make a resubmission skip training), and
per-subject job records (which list the sha256 of every photo it trained on).
`forget_concept` removes them all, grants first so that no one else can use
the concept while the rest goes, and redacts the concept's rows in job
summaries. The chat API's `DELETE /v1/concepts/{name}` and `cluster.ops
concepts rm OWNER/NAME` both call it.
"""

from __future__ import annotations

from cluster.keys import done_prefix, job_prefix, subject_record_key
from cluster.shares import Grants
from cluster.store_base import ArtifactStore, ObjectNotFound
from yollava.tokens import check_name

_KEPT_IN_SUMMARY = ("owner", "name")


def forget_concept(store: ArtifactStore, owner: str, name: str) -> dict:
    """Delete owner/name and its grants, markers and job records; returns what was deleted."""
    check_name(owner, "owner")
    check_name(name, "name")
    grants = Grants(store).drop(owner, name)
    versions = store.delete_concept(owner, name)
    markers = store.delete_prefix(done_prefix(owner, name))
    records = summaries = 0
    keys = store.list_prefix("jobs")
    for job_id in sorted({k.split("/")[1] for k in keys}):
        record = subject_record_key(job_id, owner, name)
        if record in keys:
            store.delete_key(record)
            records += 1
        summary = f"{job_prefix(job_id)}/summary.json"
        if summary in keys and _redact_summary(store, summary, owner, name):
            summaries += 1
    return {"owner": owner, "name": name, "versions": versions, "grants": grants, "markers": markers,
            "records": records, "summaries": summaries}


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
