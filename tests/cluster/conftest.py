"""Fixtures for the cluster tests: an S3-compatible server on loopback and a store per backend.

The S3 server: `YOLLAVA_TEST_S3_ENDPOINT` (e.g. `http://127.0.0.1:9000`) names
one CI started, used with the AWS_* credentials CI exported (dummy ones where
it exported none). Without it, moto's server runs in this process on
127.0.0.1, on a port the OS picks, with dummy credentials and no AWS config
files, so no test can reach a real account.
"""

import os
import uuid

import boto3
import pytest
import ray

from cluster.store import MiB, open_store

ENDPOINT_ENV = "YOLLAVA_TEST_S3_ENDPOINT"
DUMMY_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}
# Small, so a 6 MiB blob goes up in two parts (S3's smallest part is 5 MiB).
MULTIPART = {"multipart_threshold": 5 * MiB, "multipart_chunksize": 5 * MiB}


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of an S3-compatible server: CI's, or a moto server started here and stopped at the end."""
    from bench.reliability import s3_server

    with s3_server() as url:
        yield url


@pytest.fixture
def s3_client(s3_endpoint, monkeypatch, tmp_path):
    """A boto3 client for the test server, with the test's AWS environment in place."""
    external = ENDPOINT_ENV in os.environ
    for key, value in DUMMY_AWS_ENV.items():
        if not (external and key in os.environ):
            monkeypatch.setenv(key, value)
    if not external:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3_bucket(s3_client):
    """A fresh bucket for one test, emptied and removed afterwards."""
    bucket = f"yollava-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    yield bucket
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objects = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
        if objects:
            s3_client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    s3_client.delete_bucket(Bucket=bucket)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """The same store interface over a local folder and over S3 (`s3://<bucket>/root`)."""
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/root", endpoint_url=request.getfixturevalue("s3_endpoint"), **MULTIPART)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs for the whole session; workers get dummy AWS credentials (moto)."""
    env = {} if os.environ.get(ENDPOINT_ENV) else dict(DUMMY_AWS_ENV)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # notice finished/dead workers sooner
    if ray.is_initialized():  # another module's Ray, without the workers' environment above
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    yield ray
    ray.shutdown()
