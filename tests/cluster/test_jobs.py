"""A job's identity and its share of the cluster (issue 15, finding 4)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import ops
from cluster.personalize import main
from cluster.store import open_store
from tests.cluster.helpers import SUBJECTS, write_request

ROOT = Path(__file__).resolve().parents[2]


def test_a_reused_job_id_is_refused_before_anything_runs(tmp_path, capsys):
    store_dir = tmp_path / "store"
    path = write_request(tmp_path, str(store_dir), subjects=SUBJECTS[:1], pool=0)
    assert main([str(path), "--local", "--no-progress", "--job-id", "job-once"]) == 0
    store = open_store(str(store_dir))
    before = {k: store.get_bytes(k) for k in store.list_prefix("jobs/job-once")}
    capsys.readouterr()
    # Even a request that would train something new must not be read as the earlier run's.
    assert main([str(path), "--local", "--no-progress", "--force", "--job-id", "job-once"]) == 2
    err = capsys.readouterr().err
    assert "job_id='job-once'" in err and "already" in err
    assert {k: store.get_bytes(k) for k in store.list_prefix("jobs/job-once")} == before
    assert store.versions("alice", "bo") == [1]


def bundles(request):
    return sorted(json.dumps(b, sort_keys=True) for b in request)


def test_requests_of_concurrent_jobs_combine_and_one_ending_keeps_the_others(ray_local):
    from cluster.resources import job_request

    ops.scale(gpus=1, cpus_per_gpu=2)  # an operator's request ahead of a batch
    operator = [{"GPU": 1, "CPU": 2}]
    try:
        with job_request("job-a", [{"CPU": 1}]):
            with job_request("job-b", [{"CPU": 3}] * 2):
                assert bundles(ops.resource_request()) == bundles(operator + [{"CPU": 1}] + [{"CPU": 3}] * 2)
            assert bundles(ops.resource_request()) == bundles(operator + [{"CPU": 1}])
        assert bundles(ops.resource_request()) == bundles(operator)
    finally:
        ops.scale(None, release=True)
    assert ops.resource_request() == []


DRIVER = """
import sys, time, ray
from cluster.resources import set_job_request
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
set_job_request("job-dead", [{"CPU": 5}])
print("requested", flush=True)
time.sleep(600)
"""


def test_a_killed_drivers_share_is_cleared_by_release_and_a_live_one_is_kept(ray_local):
    from cluster.resources import job_request, shares

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, ray_local.get_runtime_context().gcs_address],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "requested"
        with job_request("job-live", [{"CPU": 1}]):
            assert bundles(ops.resource_request()) == bundles([{"CPU": 5}, {"CPU": 1}])
            driver.send_signal(signal.SIGKILL)  # no finally runs in a killed driver
            driver.wait(timeout=30)
            deadline = time.monotonic() + 60
            while not shares()["job-dead"]["dead"] and time.monotonic() < deadline:
                time.sleep(0.5)
            assert shares()["job-dead"]["dead"], "Ray never saw the killed driver's job end"
            assert bundles(ops.resource_request()) == bundles([{"CPU": 5}, {"CPU": 1}])  # left set...
            assert ops.main(["scale", "--release"]) == 0  # ...until an operator releases the dead shares
            assert bundles(ops.resource_request()) == bundles([{"CPU": 1}])
            assert set(shares()) == {"job-live"}
        assert ops.resource_request() == []
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)


def test_release_of_a_named_job_and_bad_arguments(ray_local, capsys):
    from cluster.resources import set_job_request, shares

    set_job_request("job-stuck", [{"CPU": 1}])
    assert ops.main(["scale", "--release", "--job", "job-stuck"]) == 0
    assert "job-stuck" not in shares() and ops.resource_request() == []
    with pytest.raises(SystemExit):
        ops.main(["scale", "--gpus", "1", "--job", "job-stuck"])  # --job goes with --release only
    assert "--job" in capsys.readouterr().err
