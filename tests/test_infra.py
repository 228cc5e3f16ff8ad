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


# --- KubeRay manifests, container image ------------------------------------------------------

import importlib.util
import re
import shlex
import subprocess
import sys

INFRA = ROOT / "infra"


def manifests():
    out = {}
    for path in sorted(INFRA.glob("*.yaml")):
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def test_every_manifest_parses_and_has_a_kind():
    docs = manifests()
    assert {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "minio.yaml"} <= set(docs)
    for name, items in docs.items():
        assert items, name
        assert all("kind" in d and "apiVersion" in d for d in items), name


def test_rayservice_embeds_serve_config_verbatim_and_it_validates():
    from ray.serve.schema import ServeDeploySchema

    assert subprocess.run([sys.executable, str(INFRA / "render.py"), "--check"]).returncode == 0
    svc = manifests()["rayservice.yaml"][0]
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(embedded)
    for app in embedded["applications"]:
        module, attr = app["import_path"].split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None, module
        assert re.search(rf"^def {attr}\(", Path(spec.origin).read_text(), re.M), app["import_path"]


def test_rayjob_entrypoint_is_a_real_module():
    job = manifests()["rayjob.yaml"][0]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    assert importlib.util.find_spec(argv[2]) is not None, argv[2]
    assert argv[3].startswith("s3://")


def _containers(doc):
    spec = doc["spec"]
    spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return spec, groups, [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_ray_clusters_autoscale_with_gpu_workers():
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        spec, groups, _ = _containers(manifests()[name][0])
        assert spec["enableInTreeAutoscaling"] is True, name
        workers = groups[1:]
        assert workers, name
        for g in workers:
            assert g["minReplicas"] <= g["maxReplicas"], name
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert limits.get("nvidia.com/gpu"), name


def test_secrets_are_referenced_never_inlined():
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "Secret":
                raise AssertionError(f"{name} inlines a Secret")
            text = yaml.safe_dump(doc)
            assert "AWS_SECRET_ACCESS_KEY:" not in text.replace("key: AWS_SECRET_ACCESS_KEY", ""), name
            for c in (_containers(doc)[2] if doc["kind"].startswith("Ray") else []):
                for env in c.get("env", []):
                    assert "valueFrom" in env or not re.search("KEY|SECRET|PASSWORD", env["name"]), env


def test_image_installs_the_project():
    text = (INFRA / "Dockerfile").read_text()
    assert "requirements.lock" in text and "pip install" in text
    import tomllib

    packages = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for pattern in packages["find"]["include"]:  # every package the project installs is in the image
        assert f"COPY {pattern.rstrip('*')} " in text, pattern
    for alias in ("models/mini",):  # and the shipped miniature model that `--model mini` names
        assert f"COPY {alias} " in text


def test_only_the_miniworld_subjects_are_committed_images():
    """Demo photos are generated; the only committed images are the miniature world's sample
    subjects, and those are exactly what their generator writes (checked in test_miniworld)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (e.g. an sdist): nothing to check
        return
    images = [p for p in tracked if p.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
              and not p.startswith("examples/miniworld/")]
    assert images == [], images


def test_example_request_is_valid_and_its_photos_decode():
    from cluster.request import check_subjects, load_request
    from yollava.recipe import RecipeConfig

    req = load_request(str(ROOT / "examples" / "request.yaml"))
    assert req.base_model == "mini"
    RecipeConfig.from_dict(req.recipe)
    checked = check_subjects(req)
    assert len(checked) == 6 and all(c.valid for c in checked), [c.reason for c in checked]
