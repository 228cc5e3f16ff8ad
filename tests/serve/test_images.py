import base64
import io

import pytest
from PIL import Image

from serve.images import ImageError, ImageLimits, decode_data_url
from tests.conftest import random_photo

LIMITS = ImageLimits(max_bytes=200_000, max_pixels=256 * 256)


def url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_decodes_a_photo_exactly():
    photo = random_photo(3, 40)
    out = decode_data_url(url(png(photo)), LIMITS)
    assert out.mode == "RGB" and out.tobytes() == photo.tobytes()


def test_grey_and_alpha_become_rgb():
    assert decode_data_url(url(png(Image.new("LA", (8, 8)))), LIMITS).mode == "RGB"


@pytest.mark.parametrize("value, words", [
    (url(png(Image.new("L", (300, 300)))), "pixels"),  # refused from the header
    (url(png(Image.new("1", (20000, 20000)))), "pixels"),  # a 1-bit bomb: tiny file, 400M pixels
    ("data:image/png;base64,%%%", "base64"),
    (url(b"GIF89a not really"), "not an image|corrupt"),
    (url(b"just text, no image"), "not an image"),
    (url(b""), "empty"),
    (url(png(random_photo(1, 40)))[:-100], "truncated"),
    ("data:image/png;base64," + "A" * 300_000, "larger than"),
    ("https://example.com/cat.png", "not fetched"),
    ("file:///etc/passwd", "data URL"),
])
def test_bad_images_are_refused_with_a_reason(value, words):
    with pytest.raises(ImageError, match=words):
        decode_data_url(value, LIMITS, "img")
