"""/healthz says whether the service is up, and nothing about how it is made (issue 15, finding 5)."""

import asyncio
import types

from serve.app import ChatIngress


def test_healthz_reports_readiness_only():
    ingress = ChatIngress.func_or_class  # the class behind the deployment, without Ray
    body = asyncio.run(ingress.healthz(types.SimpleNamespace(model_id="/mnt/secret/checkpoints/llava-13b")))
    assert body == {"status": "ok"}
