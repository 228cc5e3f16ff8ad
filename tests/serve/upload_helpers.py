"""The chat app with uploads on a local Ray whose job API (the dashboard) is up: for the upload tests."""

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serve.keys import create_key
from tests.serve.conftest import ROOT, TenantClients, free_port

SAMPLES = ROOT / "examples" / "miniworld"


@dataclass
class UploadApp(TenantClients):
    url: str
    keys: dict
    store_uri: str
    args: dict = field(default_factory=dict)

    def deploy(self, **changes) -> None:
        """(Re)deploy the app; a changed `uploads` restarts the queue's replica, as a redeploy does."""
        from ray import serve

        from serve.app import AppArgs, build_app

        self.args.update(changes)
        serve.run(build_app(AppArgs(**self.args)), name="yollava", route_prefix="/", blocking=False)
        wait_for(lambda: httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200, 120, "the app to answer")

    def stop_service(self) -> None:
        """The service goes away (all its replicas, the queue's too); Ray and its jobs stay."""
        from ray import serve

        serve.delete("yollava")


def wait_for(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def upload_app(tmp_path: Path, tenants, model: str, queue: dict, limits: dict | None = None,
               upload_limits: dict | None = None, env: dict | None = None):
    """Ray (4 logical CPUs, the dashboard on a free port) + Serve + the app with uploads, file store."""
    import ray
    from ray import serve

    keys_file = tmp_path / "keys.json"
    keys = {t: create_key(keys_file, t) for t in tenants}
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    if ray.is_initialized():  # another module's Ray, without a dashboard
        ray.shutdown()
    dashboard = free_port()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=dashboard, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **(env or {})}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = UploadApp(f"http://127.0.0.1:{port}", keys, store_dir.as_uri(), {
            "store": store_dir.as_uri(), "keys": str(keys_file), "model": model, "torch_threads": 1,
            "revalidate_s": 0.0, "limits": limits or {},
            "uploads": {"limits": upload_limits or {},
                        "queue": {"job_api": f"http://127.0.0.1:{dashboard}", "poll_s": 0.5, **queue}}})
        app.deploy()
        yield app
    finally:
        serve.shutdown()
        ray.shutdown()


def ray_jobs(app: UploadApp) -> list:
    """Every job the queue submitted to Ray (its metadata names the batch)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(app.args["uploads"]["queue"]["job_api"])
    return [j for j in client.list_jobs() if (j.metadata or {}).get("yollava_batch")]
