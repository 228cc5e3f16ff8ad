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


# Committed on purpose besides the sample subjects: the README's screenshot of the web page.
ALLOWED_IMAGES = {"docs/page.png": 200_000}  # path -> most bytes


def test_only_the_miniworld_subjects_are_committed_images():
    """Demo photos are generated; the only committed images are the miniature world's sample
    subjects, and those are exactly what their generator writes (checked in test_miniworld),
    and the README's small screenshot of the page."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (e.g. an sdist): nothing to check
        return
    images = [p for p in tracked if p.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
              and not p.startswith("examples/miniworld/")]
    assert [p for p in images if p not in ALLOWED_IMAGES] == [], images
    for p in images:
        if p in ALLOWED_IMAGES:
            assert (ROOT / p).stat().st_size <= ALLOWED_IMAGES[p], p


def test_example_request_is_valid_and_its_photos_decode():
    from cluster.request import check_subjects, load_request
    from yollava.recipe import RecipeConfig

    req = load_request(str(ROOT / "examples" / "request.yaml"))
    assert req.base_model == "mini"
    RecipeConfig.from_dict(req.recipe)
    checked = check_subjects(req)
    assert len(checked) == 6 and all(c.valid for c in checked), [c.reason for c in checked]


# --- the cluster's own doors (issue 15, finding 7) ---------------------------------------------------
#
# Kubernetes NetworkPolicy semantics, evaluated on the manifests: a pod selected by any policy of
# type Ingress accepts only what some rule of those policies allows (peers: podSelector in the
# policy's namespace, namespaceSelector, both = both; ports by number or by container port name).

NAMESPACE = "yollava"  # where the manifests are applied (they name none)
RAY_PORTS = {"dashboard/jobs API": 8265, "gcs": 6379, "client": 10001, "dashboard agent": 52365}


def _selects(selector, labels):
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer, source, policy_ns):
    if "ipBlock" in peer:
        return source.get("external", False)
    if source.get("external"):
        return False
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    ns_ok = _selects(ns_sel, source["ns_labels"]) if ns_sel is not None else source["ns"] == policy_ns
    pod_ok = _selects(pod_sel, source["labels"]) if pod_sel is not None else True
    return ns_ok and pod_ok


def _port_matches(rule_ports, port, port_names):
    if not rule_ports:
        return True
    for p in rule_ports:
        want = p.get("port")
        if want is None or want == port or (isinstance(want, str) and port_names.get(want) == port):
            return True
    return False


def network_policies():
    return [d for docs in manifests().values() for d in docs if d["kind"] == "NetworkPolicy"]


def allowed(source, target, port):
    """Whether `source` may open a connection to `target` on `port` under the manifests' policies."""
    selecting = [p for p in network_policies()
                 if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _selects(p["spec"]["podSelector"], target["labels"])]
    if not selecting:
        return True  # not isolated
    for p in selecting:
        for rule in p["spec"].get("ingress") or []:
            peers = rule.get("from")
            if (not peers or any(_peer_matches(peer, source, NAMESPACE) for peer in peers)) and \
                    _port_matches(rule.get("ports"), port, target["port_names"]):
                return True
    return False


def pod(ns, labels, port_names=None):
    return {"ns": ns, "ns_labels": {"kubernetes.io/metadata.name": ns}, "labels": labels,
            "port_names": port_names or {}}


def ray_pods(name):
    """The head and worker pods KubeRay makes from a manifest: its template labels plus KubeRay's own."""
    spec, groups, _ = _containers(manifests()[name][0])
    out = []
    for i, g in enumerate(groups):
        labels = {**(g["template"].get("metadata", {}).get("labels") or {}),
                  "ray.io/node-type": "head" if i == 0 else "worker", "ray.io/is-ray-node": "yes",
                  "ray.io/cluster": name.removesuffix(".yaml"), "app.kubernetes.io/created-by": "kuberay-operator"}
        names = {p["name"]: p["containerPort"] for c in g["template"]["spec"]["containers"] for p in c.get("ports", [])}
        out.append(pod(NAMESPACE, labels, names))
    return out


OUTSIDER = pod("other-team", {"app": "anything"})
NEIGHBOUR = pod(NAMESPACE, {"app": "not-ray"})  # same namespace, not one of ours
OPERATOR = pod("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
INGRESS = pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
INTERNET = {"external": True}


def test_ray_cluster_launcher_binds_the_dashboard_to_localhost():
    config = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in (ROOT / "ray-cluster.yaml").read_text()


def test_ray_dashboards_and_job_apis_are_closed_to_everyone_but_the_operator_and_the_cluster():
    assert network_policies(), "no NetworkPolicy in infra/"
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        head, *workers = ray_pods(name)
        assert workers
        for what, port in RAY_PORTS.items():
            for stranger in (OUTSIDER, NEIGHBOUR, INGRESS, INTERNET):
                assert not allowed(stranger, head, port), f"{name}: {what} ({port}) open to {stranger}"
        assert allowed(OPERATOR, head, 8265), f"{name}: the KubeRay operator cannot reach the dashboard"
        assert allowed(workers[0], head, 6379), f"{name}: workers cannot reach their head"
        assert not allowed(OPERATOR, head, 6379), f"{name}: the operator needs the dashboard only"


def test_the_chat_service_and_the_jobs_cannot_reach_each_others_ray():
    jobs = ray_pods("raycluster.yaml") + ray_pods("rayjob.yaml")
    chat = ray_pods("rayservice.yaml")
    for a, b in ((chat, jobs), (jobs, chat)):
        for port in RAY_PORTS.values():
            assert not allowed(a[0], b[0], port) and not allowed(a[1], b[0], port), port


def test_chat_is_reached_only_through_a_tls_ingress():
    ingresses = [d for docs in manifests().values() for d in docs if d["kind"] == "Ingress"]
    assert len(ingresses) == 1
    spec = ingresses[0]["spec"]
    hosts = {r["host"] for r in spec["rules"]}
    tls_hosts = {h for t in spec["tls"] for h in t["hosts"]}
    assert hosts and hosts <= tls_hosts and all(t["secretName"] for t in spec["tls"])
    annotations = ingresses[0]["metadata"].get("annotations", {})
    assert annotations.get("nginx.ingress.kubernetes.io/force-ssl-redirect") == "true"
    backends = {(p["backend"]["service"]["name"], p["backend"]["service"]["port"]["number"])
                for r in spec["rules"] for p in r["http"]["paths"]}
    service = manifests()["rayservice.yaml"][0]["metadata"]["name"] + "-serve-svc"  # KubeRay's name for it
    assert backends == {(service, 8000)}
    chat_head, chat_worker = ray_pods("rayservice.yaml")
    for target in (chat_head, chat_worker):
        assert allowed(INGRESS, target, 8000)
        for stranger in (OUTSIDER, NEIGHBOUR, INTERNET):
            assert not allowed(stranger, target, 8000)


def _secret_refs(doc):
    refs = set()
    for c in _containers(doc)[2] if doc["kind"].startswith("Ray") else _pod_containers(doc):
        refs |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                 if "secretKeyRef" in e.get("valueFrom", {})}
    return refs


def _pod_containers(doc):
    spec = doc.get("spec", {})
    spec = spec.get("jobTemplate", {}).get("spec", spec)
    template = spec.get("template", {}).get("spec", {})
    return template.get("containers", []) + template.get("initContainers", [])


def _minio_policies():
    docs = manifests()["minio.yaml"]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "yollava-minio-policies")
    return {k.removesuffix(".json"): json.loads(v) for k, v in config["data"].items() if k.endswith(".json")}


def _grants(policy, action, key):
    """Whether an IAM-style policy allows `action` on object `key` of the artifacts bucket."""
    import fnmatch

    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if st["Effect"] == "Allow" and any(fnmatch.fnmatchcase(action, a) for a in actions) and \
                any(fnmatch.fnmatchcase(f"arn:aws:s3:::yollava-artifacts/{key}", r) for r in resources):
            return True
    return False


def test_chat_and_jobs_use_separate_least_privilege_s3_identities():
    root_secret = "yollava-minio-root"
    chat_refs = _secret_refs(manifests()["rayservice.yaml"][0])
    job_refs = _secret_refs(manifests()["rayjob.yaml"][0]) | _secret_refs(manifests()["raycluster.yaml"][0])
    assert chat_refs == {"yollava-s3-chat"}
    assert job_refs == {"yollava-s3-jobs"}
    for name, docs in manifests().items():
        for doc in docs:
            refs = _secret_refs(doc) if doc["kind"] in ("Deployment", "Job", "RayJob", "RayService",
                                                           "RayCluster") else set()
            if root_secret in refs:
                assert name == "minio.yaml" and doc["kind"] in ("Deployment", "Job"), (name, doc["kind"])
    policies = _minio_policies()
    assert set(policies) == {"yollava-chat", "yollava-jobs"}
    chat, jobs = policies["yollava-chat"], policies["yollava-jobs"]
    for policy in (chat, jobs):
        for st in policy["Statement"]:
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert "s3:*" not in actions and not any(a.startswith("admin:") for a in actions), st
            for r in st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]:
                assert r.startswith("arn:aws:s3:::yollava-artifacts"), r
    prod = "prod"
    # the chat reads concepts and manages grants; it never writes a concept or the owner policy
    assert _grants(chat, "s3:GetObject", f"{prod}/concepts/alice/bo/v1/manifest.json")
    assert _grants(chat, "s3:PutObject", f"{prod}/shares/alice/bo/bob.json")
    assert not _grants(chat, "s3:PutObject", f"{prod}/concepts/alice/bo/v1/manifest.json")
    assert not _grants(chat, "s3:PutObject", f"{prod}/policy/owners.yaml")
    assert not _grants(chat, "s3:GetObject", "photos/alice/bo/1.png")
    # the jobs write concepts, markers, records; never grants, never the policy they are held to
    assert _grants(jobs, "s3:PutObject", f"{prod}/concepts/alice/bo/v1/manifest.json")
    assert _grants(jobs, "s3:GetObject", f"{prod}/policy/owners.yaml")
    assert not _grants(jobs, "s3:PutObject", f"{prod}/policy/owners.yaml")
    assert not _grants(jobs, "s3:PutObject", f"{prod}/shares/alice/bo/bob.json")
    assert not _grants(jobs, "s3:GetObject", f"{prod}/shares/alice/bo/bob.json")
