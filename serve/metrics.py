"""Prometheus metrics through Ray Serve (`ray.serve.metrics`).

Outside a Ray worker (unit tests, a plain `python`) Ray's metric classes build
and record without error but nothing exports them, so they are no-ops there
by themselves; `_make` says so once in the log. Any error building a metric
(a bad name, tag keys or boundaries) is a bug and propagates.

Metrics by tenant carry a bounded label set (`TenantLabels`): the first
`max_labels` tenants a replica sees are labelled by name, every later one is
`other`, so a million tenants cannot make a million time series.
"""

from __future__ import annotations

import functools
import logging

import ray
from ray.serve import metrics

log = logging.getLogger(__name__)

OTHER = "other"
REJECTIONS = ("rate", "in_flight", "overloaded", "unknown_concepts")  # the `reason` label's values


@functools.cache
def _say_not_exported() -> None:
    log.warning("not inside Ray (ray.is_initialized() is False): metrics are recorded but not exported")


def _make(kind: str, name: str, description: str, tag_keys: tuple = (), **kw):
    if not ray.is_initialized():
        _say_not_exported()
    return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **kw)


class TenantLabels:
    """tenant -> its metric label: its name for the first `max_labels` tenants seen, then `other`."""

    def __init__(self, max_labels: int = 64):
        if max_labels < 0:
            raise ValueError(f"max_labels={max_labels} must be >= 0")
        self.max_labels = max_labels
        self._named: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self._named:
            return tenant
        if len(self._named) < self.max_labels and tenant != OTHER:
            self._named.add(tenant)
            return tenant
        return OTHER


class ModelMetrics:
    """Counters of the model deployment: tokens, steps, queues, concept cache."""

    def __init__(self):
        self.requests = _make("Counter", "yollava_chat_requests", "Chat requests by outcome.", ("outcome",))
        self.prompt_tokens = _make("Counter", "yollava_prompt_tokens", "Prompt tokens processed.")
        self.completion_tokens = _make("Counter", "yollava_completion_tokens", "Tokens generated.")
        self.tenant_tokens = _make("Counter", "yollava_tenant_tokens",
                                   "Tokens by tenant (bounded labels) and kind (prompt, completion).",
                                   ("tenant", "kind"))
        self.queue_length = _make("Gauge", "yollava_queue_length",
                                  "Requests waiting for admission, by tenant (bounded labels).", ("tenant",))
        self.rejections = _make("Counter", "yollava_model_rejections",
                                "Requests refused by the model replica, by tenant and reason.", ("tenant", "reason"))
        # Ray wants positive bounds: the first bucket (<= 0.5) counts requests without a concept.
        self.concepts_per_request = _make("Histogram", "yollava_concepts_per_request",
                                          "Concepts resolved per request.", boundaries=[0.5, 1, 2, 4, 8, 16])
        self.batch_size = _make("Histogram", "yollava_batch_size", "Rows decoded together in a step.",
                                boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.cache = _make("Counter", "yollava_concept_cache_events",
                           "Concept cache hits, misses, loads, evictions, revalidations, stale serves.", ("event",))
        self.cache_bytes = _make("Gauge", "yollava_concept_cache_bytes", "Bytes held by the concept cache.")

    def cache_event(self, event: str) -> None:
        self.cache.inc(tags={"event": event})

    def batch(self, n: int) -> None:
        self.batch_size.observe(n)


class IngressMetrics:
    """Responses by route and status are Serve's own `serve_num_http_requests`; this adds chat latency
    and the ingress's refusals by tenant and reason."""

    def __init__(self):
        self.latency = _make("Histogram", "yollava_api_latency_ms", "API latency (ms) by route.",
                             ("route",), boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000])
        self.rejections = _make("Counter", "yollava_rejections",
                                "Chat requests refused at the ingress, by tenant (bounded labels) and reason.",
                                ("tenant", "reason"))
