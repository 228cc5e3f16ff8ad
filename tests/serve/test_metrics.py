"""Metrics are Ray's own everywhere; outside Ray they export nothing and the log says so once."""

import logging

import pytest
from ray.util.metrics import Metric

from serve import metrics
from serve.metrics import IngressMetrics, ModelMetrics


@pytest.fixture
def outside_ray(monkeypatch):
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: False)
    metrics._say_not_exported.cache_clear()
    yield
    metrics._say_not_exported.cache_clear()


def test_every_metric_is_a_ray_metric(outside_ray):
    """None silently replaced by a stand-in (a bucket bound of 0 once made one a no-op)."""
    for group in (ModelMetrics(), IngressMetrics()):
        for name, metric in vars(group).items():
            assert isinstance(metric, Metric), name


def test_metrics_record_outside_ray(outside_ray):
    m = ModelMetrics()
    m.concepts_per_request.observe(0)
    m.batch(3)
    m.cache_event("hits")
    m.requests.inc(tags={"outcome": "ok"})
    m.cache_bytes.set(0)


@pytest.mark.parametrize("kind, kw, error", [
    ("Histogram", {"boundaries": [0, 1]}, ValueError),
    ("Histogram", {}, ValueError),
    ("Counter", {"tag_keys": ["outcome"]}, TypeError),
])
def test_a_bad_metric_is_an_error_not_a_no_op(outside_ray, kind, kw, error):
    with pytest.raises(error):
        metrics._make(kind, "yollava_test_metric", "a test", **kw)


def test_outside_ray_is_said_once(outside_ray, caplog):
    with caplog.at_level(logging.INFO, logger="serve.metrics"):
        ModelMetrics()
        IngressMetrics()
    lines = [r.getMessage() for r in caplog.records if r.name == "serve.metrics"]
    assert len(lines) == 1 and "not inside Ray" in lines[0] and "not exported" in lines[0]


def test_inside_ray_says_nothing(monkeypatch, caplog):
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: True)
    metrics._say_not_exported.cache_clear()
    with caplog.at_level(logging.INFO, logger="serve.metrics"):
        IngressMetrics()
    assert not [r for r in caplog.records if r.name == "serve.metrics"]
