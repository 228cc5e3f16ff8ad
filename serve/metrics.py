"""Prometheus metrics through Ray Serve (`ray.serve.metrics`).

Outside a Ray worker (unit tests, a plain `python`) Ray's metric classes build
and record without error but nothing exports them, so they are no-ops there
by themselves; `_make` says so once in the log. Any error building a metric
(a bad name, tag keys or boundaries) is a bug and propagates.
"""

from __future__ import annotations

import functools
import logging

import ray
from ray.serve import metrics

log = logging.getLogger(__name__)


@functools.cache
def _say_not_exported() -> None:
    log.warning("not inside Ray (ray.is_initialized() is False): metrics are recorded but not exported")


def _make(kind: str, name: str, description: str, tag_keys: tuple = (), **kw):
    if not ray.is_initialized():
        _say_not_exported()
    return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **kw)


class ModelMetrics:
    """Counters of the model deployment: tokens, batches, concept cache."""

    def __init__(self):
        self.requests = _make("Counter", "yollava_chat_requests", "Chat requests by outcome.", ("outcome",))
        self.prompt_tokens = _make("Counter", "yollava_prompt_tokens", "Prompt tokens processed.")
        self.completion_tokens = _make("Counter", "yollava_completion_tokens", "Tokens generated.")
        # Ray wants positive bounds: the first bucket (<= 0.5) counts requests without a concept.
        self.concepts_per_request = _make("Histogram", "yollava_concepts_per_request",
                                          "Concepts resolved per request.", boundaries=[0.5, 1, 2, 4, 8, 16])
        self.batch_size = _make("Histogram", "yollava_batch_size", "Requests decoded together.",
                                boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.cache = _make("Counter", "yollava_concept_cache_events",
                           "Concept cache hits, misses, loads, evictions, revalidations.", ("event",))
        self.cache_bytes = _make("Gauge", "yollava_concept_cache_bytes", "Bytes held by the concept cache.")

    def cache_event(self, event: str) -> None:
        self.cache.inc(tags={"event": event})

    def batch(self, n: int) -> None:
        self.batch_size.observe(n)


class IngressMetrics:
    """Responses by route and status are Serve's own `serve_num_http_requests`; this adds chat latency."""

    def __init__(self):
        self.latency = _make("Histogram", "yollava_api_latency_ms", "API latency (ms) by route.",
                             ("route",), boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000])
