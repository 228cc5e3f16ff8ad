"""Cluster and deployment files parse and validate against Ray's own schemas."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_validates_against_ray_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # Ray's own checks after its defaults are filled in


def test_ray_cluster_yaml_has_gpu_workers_that_scale():
    config = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert all(v["min_workers"] <= v["max_workers"] for v in workers.values())
    assert config["idle_timeout_minutes"] > 0
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
