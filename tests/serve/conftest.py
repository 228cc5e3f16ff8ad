"""One Ray + Serve app for the serve tests: tiny model, concepts in S3 on loopback, three tenants."""

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest

from cluster.store import open_store
from tests.cluster.conftest import DUMMY_AWS_ENV, ENDPOINT_ENV, s3_endpoint  # noqa: F401 (fixture)
from tests.conftest import random_rows
from yollava.artifacts import TENSORS_FILE, ConceptArtifact

from serve.keys import create_key

ROOT = Path(__file__).resolve().parents[2]
TENANTS = ("alice", "bob", "carol")
# (owner, name, seed): bob has a `bo` too, to prove names resolve per tenant.
CONCEPTS = [("alice", "bo", 1), ("alice", "mam", 2), ("bob", "bo", 3), ("bob", "cup", 4), ("carol", "mug", 5)]
CROWD = [(TENANTS[i % 3], f"c{i}", 100 + i) for i in range(32)]  # for the batching test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_concept(store, tiny, owner, name, seed, k=4, scale=3.0):
    return store.put_concept(ConceptArtifact(owner, random_rows(tiny, name, k=k, seed=seed, scale=scale),
                                             "tiny", tiny.fingerprint))


def tamper(store, owner, name, version=1):
    """Flip one byte of the stored tensors (their data is at the end of the file)."""
    key = f"concepts/{owner}/{name}/v{version}/{TENSORS_FILE}"
    data = bytearray(store.get_bytes(key))
    data[-1] ^= 0xFF
    store.put_bytes(key, bytes(data))


class TenantClients:
    """`client(tenant)`: an HTTP client of the app at `self.url` with that tenant's key (`self.keys`)."""

    url: str
    keys: dict

    def client(self, tenant: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)


@dataclass
class LiveApp(TenantClients):
    url: str
    keys: dict
    store: object
    store_uri: str
    endpoint: str
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="session")
def aws_env(s3_endpoint):  # noqa: F811
    """Dummy credentials for the loopback server (CI's own when it gave an endpoint)."""
    mp = pytest.MonkeyPatch()
    external = ENDPOINT_ENV in os.environ
    for key, value in DUMMY_AWS_ENV.items():
        if not (external and key in os.environ):
            mp.setenv(key, value)
    if not external:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    yield {k: os.environ[k] for k in (*DUMMY_AWS_ENV, "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
           if k in os.environ}
    mp.undo()


@pytest.fixture(scope="module")
def live(tiny, s3_endpoint, aws_env, tmp_path_factory):  # noqa: F811
    """The app on a local Ray, for one test module; Ray is shut down after it unless it was running
    already (the cluster tests' session-wide `ray_local`), so the two can run in one session."""
    import ray  # a broken Ray install is an error here, never a skip
    from ray import serve

    from serve.app import AppArgs, build_app

    bucket = f"yollava-serve-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/root"
    store = open_store(uri, endpoint_url=s3_endpoint)
    for owner, name, seed in CONCEPTS + CROWD:
        save_concept(store, tiny, owner, name, seed)
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {t: create_key(keys_file, t) for t in TENANTS}

    port = free_port()
    env = {"PYTHONPATH": str(ROOT), **aws_env}
    started = not ray.is_initialized()
    metrics_port = free_port() if started else None
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
                 _metrics_export_port=metrics_port)
    else:  # a Ray started by another module (the cluster tests' session Ray): ask it for its port
        metrics_port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = AppArgs(store=uri, keys=str(keys_file), model="tiny", s3_endpoint_url=s3_endpoint,
                       revalidate_s=0.0, torch_threads=1,
                       tenant_limits={"requests_per_s": 2, "burst": 100, "max_in_flight": 24},
                       limits={"max_body_bytes": 2_000_000, "max_image_bytes": 400_000,
                               "max_image_pixels": 512 * 512, "max_images": 2, "max_concepts": 4,
                               "max_tokens": 64, "default_max_tokens": 16})
        serve.run(build_app(args), name="yollava", route_prefix="/", blocking=False)
        app = LiveApp(f"http://127.0.0.1:{port}", keys, store, uri, s3_endpoint,
                      {"metrics_port": metrics_port})
        with httpx.Client(base_url=app.url) as c:
            assert c.get("/healthz").status_code == 200
        yield app
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def model_handle(live):
    from ray import serve

    return serve.get_deployment_handle("ChatModel", app_name="yollava")
