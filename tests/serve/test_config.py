"""serve/config.yaml agrees with the code; the builder and the laptop command validate their arguments."""

import inspect
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve.app import AppArgs, ChatIngress, ChatModel, build_app
from serve.keys import KeyRing
from serve.__main__ import parse, prepare

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"


def test_config_is_a_valid_serve_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    AppArgs.model_validate(app.args)  # every arg is one build_app takes
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {ChatIngress.name, ChatModel.name}
    model = deployments[ChatModel.name]
    auto = model.autoscaling_config
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"]
    assert auto["target_ongoing_requests"] > 0
    assert model.ray_actor_options.num_gpus == 1
    assert model.max_ongoing_requests >= app.args["max_batch_size"]


def test_builder_is_typed():
    assert inspect.signature(build_app).parameters["args"].annotation in (AppArgs, "AppArgs")


def test_app_args_refuse_unknown_and_bad_values():
    with pytest.raises(ValidationError):
        AppArgs(store="file:///tmp/x", keys="k.json", modle="tiny")
    with pytest.raises(ValidationError):
        AppArgs(store="file:///tmp/x", keys="k.json", cache_mb=0)
    with pytest.raises(ValidationError):
        AppArgs(store="file:///tmp/x")  # no keys, no service
    with pytest.raises(ValueError, match="default_max_tokens"):
        build_app(AppArgs(store="file:///tmp/x", keys="k.json",
                          limits={"max_tokens": 8, "default_max_tokens": 16}))


def test_laptop_command_makes_demo_keys(tmp_path):
    args, demo = prepare(parse(["--store", (tmp_path / "store").as_uri(), "--demo-tenants", "alice,bob"]))
    assert set(demo) == {"alice", "bob"} and (tmp_path / "store").is_dir()
    ring = KeyRing(args["keys"])
    assert {ring.tenant(k) for k in demo.values()} == {"alice", "bob"}
    assert all(k not in Path(args["keys"]).read_text() for k in demo.values())
    AppArgs(**args)
