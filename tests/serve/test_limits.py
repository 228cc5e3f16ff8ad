"""Request limits are defined once (`serve.limits.Limits`); the app's args and the image decoder use it."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve.app import AppArgs
from serve.images import ImageLimits
from serve.limits import Limits

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"


def test_app_args_limits_are_the_one_limits_model():
    assert AppArgs.model_fields["limits"].annotation is Limits
    args = AppArgs(store="file:///tmp/x", keys="k.json")
    assert type(args.limits) is Limits and args.limits == Limits()


def test_config_limits_are_limits_fields():
    doc = yaml.safe_load(CONFIG.read_text())
    given = doc["applications"][0]["args"]["limits"]
    assert set(given) <= set(Limits.model_fields)  # the others keep their defaults
    limits = AppArgs.model_validate(doc["applications"][0]["args"]).limits
    assert limits.model_dump() == {**Limits().model_dump(), **given}


def test_image_limits_come_from_limits():
    limits = Limits(max_image_bytes=1000, max_image_pixels=64)
    assert limits.image == ImageLimits(max_bytes=1000, max_pixels=64)
    with pytest.raises(TypeError):
        ImageLimits()  # no defaults of its own


@pytest.mark.parametrize("bad, words", [
    ({"max_images": 0}, "limit max_images=0 must be >= 1"),
    ({"max_tokens": 8, "default_max_tokens": 16}, "default_max_tokens=16 exceeds max_tokens=8"),
    ({"max_imgs": 3}, "max_imgs"),
])
def test_bad_limits_are_refused_naming_the_value(bad, words):
    with pytest.raises(ValidationError, match=words):
        Limits(**bad)
    with pytest.raises(ValidationError, match=words):
        AppArgs(store="file:///tmp/x", keys="k.json", limits=bad)


def test_limits_are_frozen():
    with pytest.raises(ValidationError):
        Limits().max_images = 100
