"""The autoscaler request, shared: each job (and the operator) holds its own share, the request is their sum.

Ray's `request_resources` is one cluster-wide request: a call replaces
whatever was asked before. Two jobs calling it overwrite each other, a job
clearing it at its end clears the other's too, and a killed driver leaves its
request in force. So each holder writes its own *share* to Ray's internal
key-value store (namespace `yollava`, key `resource-requests/<job id>`, with
the Ray job id of its driver), and every change re-sends the sum of the
shares of live holders. A share whose driver's Ray job has ended (killed:
no `finally` ran) is dropped at the next change, or by `python -m
cluster.ops scale --release`, which also ends the operator's own share
(`cluster.ops scale --gpus N` holds one under the name `@operator`).

Concurrent changes converge without a lock: each holder writes its share,
sends the sum it listed, then lists again and resends until the listing it
sent is still the listing, so the last request sent is the sum of the last
listing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from yollava.tokens import check_name

NAMESPACE = "yollava"
PREFIX = "resource-requests/"
OPERATOR = "@operator"  # not a valid job id, so no job can take its name
_SYNC_ROUNDS = 20
log = logging.getLogger(__name__)


def _key(holder: str) -> str:
    if holder != OPERATOR:
        check_name(holder, "job_id")
    return PREFIX + holder


def _check_bundles(bundles: list[dict]) -> list[dict]:
    if not isinstance(bundles, list) or not all(
            isinstance(b, dict) and b and all(isinstance(v, (int, float)) and v >= 0 for v in b.values())
            for b in bundles):
        raise ValueError(f"bundles={bundles!r} must be a list of non-empty {{resource: amount >= 0}} dicts")
    return bundles


def set_job_request(holder: str, bundles: list[dict]) -> None:
    """Hold `bundles` under `holder` (a job id, or OPERATOR) and re-send the sum of all shares."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_put

    entry = {"holder": holder, "bundles": _check_bundles(bundles), "pid": os.getpid(),
             "host": socket.gethostname(), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "ray_job_id": None if holder == OPERATOR else ray.get_runtime_context().get_job_id()}
    _internal_kv_put(_key(holder), json.dumps(entry), overwrite=True, namespace=NAMESPACE)
    sync()


def clear_job_request(holder: str) -> None:
    """End `holder`'s share and re-send the sum of the others."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_key(holder), namespace=NAMESPACE)
    sync()


@contextmanager
def job_request(holder: str, bundles: list[dict]) -> Iterator[None]:
    """Hold a share for the duration of the block (released however the block ends, short of a kill)."""
    set_job_request(holder, bundles)
    try:
        yield
    finally:
        clear_job_request(holder)


def shares() -> dict[str, dict]:
    """Every share in the store: holder -> entry, with `dead` (its driver's Ray job has ended)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    alive = _live_ray_jobs()
    out = {}
    for key in _internal_kv_list(PREFIX, namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:  # released meanwhile
            continue
        entry = json.loads(raw)
        entry["dead"] = entry.get("ray_job_id") is not None and entry["ray_job_id"] not in alive
        out[entry["holder"]] = entry
    return out


def release(holder: str | None = None) -> list[str]:
    """End one holder's share, or (by default) the operator's and every dead driver's; returns them."""
    from ray.experimental.internal_kv import _internal_kv_del

    current = shares()
    if holder is not None:
        _key(holder)
        doomed = [holder] if holder in current else []
    else:
        doomed = [h for h, e in current.items() if h == OPERATOR or e["dead"]]
    for h in doomed:
        _internal_kv_del(_key(h), namespace=NAMESPACE)
        log.info("released the autoscaler share of %s (%s)", h, "dead driver" if current[h]["dead"] else "asked")
    sync()
    return sorted(doomed)


def sync() -> list[dict]:
    """Send the sum of the live shares as the autoscaler request (dropping dead ones); returns it."""
    from ray.autoscaler.sdk import request_resources
    from ray.experimental.internal_kv import _internal_kv_del

    for _ in range(_SYNC_ROUNDS):
        listed = shares()
        for holder, entry in listed.items():
            if entry["dead"]:
                log.warning("dropping the autoscaler share of %s: its driver (Ray job %s, pid %s on %s) has ended",
                            holder, entry["ray_job_id"], entry["pid"], entry["host"])
                _internal_kv_del(_key(holder), namespace=NAMESPACE)
        live = {h: e for h, e in listed.items() if not e["dead"]}
        bundles = [b for h in sorted(live) for b in live[h]["bundles"]]
        if bundles:
            request_resources(bundles=bundles)
        else:
            request_resources(num_cpus=0, bundles=[])  # clears the request
        if {h: e for h, e in shares().items() if not e["dead"]} == live:
            return bundles
    log.warning("the autoscaler shares kept changing for %d rounds; the last request sent may be stale "
                "until the next change", _SYNC_ROUNDS)
    return bundles


def _live_ray_jobs() -> set[str]:
    """Ray job ids (hex) of the drivers still connected to the cluster."""
    from ray._private.state import jobs  # the GCS job table; there is no public API without the dashboard

    return {j["JobID"] for j in jobs() if not j["IsDead"]}
