"""The serving benchmark runs (small) so it never rots; its figures are printed, not asserted."""

import json

import pytest

from tests.cluster.conftest import DUMMY_AWS_ENV, ENDPOINT_ENV

pytestmark = pytest.mark.slow


def test_serve_multitenant_small(capsys, monkeypatch, s3_endpoint):
    from bench import serve_multitenant

    if ENDPOINT_ENV not in __import__("os").environ:
        for k, v in DUMMY_AWS_ENV.items():
            monkeypatch.setenv(k, v)
    result = serve_multitenant.main(["--small", "--s3-endpoint", s3_endpoint])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert {"ratio", "cold_p50_ms", "warm_p50_ms", "cold_p95_ms"} <= set(last)
    assert last["ratio"] > 0 and last["cold_p50_ms"] > 0
