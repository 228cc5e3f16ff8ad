"""Prometheus metrics through Ray Serve (`ray.serve.metrics`); no-ops outside a Ray worker."""

from __future__ import annotations


class _Noop:
    def inc(self, value=1.0, tags=None):
        pass

    def observe(self, value, tags=None):
        pass

    def set(self, value, tags=None):
        pass


def _make(kind: str, name: str, description: str, tag_keys: tuple = (), **kw):
    try:
        from ray.serve import metrics

        return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **kw)
    except Exception:  # not inside Ray (unit tests): count nothing
        return _Noop()


class ModelMetrics:
    """Counters of the model deployment: tokens, batches, concept cache."""

    def __init__(self):
        self.requests = _make("Counter", "yollava_chat_requests", "Chat requests by outcome.", ("outcome",))
        self.prompt_tokens = _make("Counter", "yollava_prompt_tokens", "Prompt tokens processed.")
        self.completion_tokens = _make("Counter", "yollava_completion_tokens", "Tokens generated.")
        self.concepts_per_request = _make("Histogram", "yollava_concepts_per_request",
                                          "Concepts resolved per request.", boundaries=[0, 1, 2, 4, 8, 16])
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
