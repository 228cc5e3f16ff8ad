"""Photos from request bytes: `data:` URLs decoded with explicit limits, before and after decoding.

Pillow reads the header (size, format) without decoding pixels, so the pixel
limit is checked before any large buffer is allocated; a decompression bomb
is refused from its header. Every decoder failure (truncated, corrupt,
not an image) becomes one `ImageError` with a message safe to show a caller.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL_RE = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=._+-]+)*;base64,", re.IGNORECASE)


class ImageError(ValueError):
    """A photo the service refuses; the message names the limit or the problem."""


@dataclass(frozen=True)
class ImageLimits:
    """The image part of `serve.limits.Limits` (where the defaults are)."""

    max_bytes: int
    max_pixels: int

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"image limits must be positive: {self}")


def decode_data_url(url: str, limits: ImageLimits, where: str = "image") -> Image.Image:
    """`data:image/...;base64,...` -> an RGB image, or ImageError."""
    m = _DATA_URL_RE.match(url)
    if not m:
        if url.startswith(("http://", "https://")):
            raise ImageError(f"{where}: remote image URLs are not fetched; send the photo as a "
                             "base64 data URL (data:image/png;base64,...)")
        raise ImageError(f"{where}: expected a base64 data URL (data:image/png;base64,...)")
    payload = url[m.end():]
    # base64 is 4/3 of the bytes: refuse before decoding anything larger than the limit.
    if len(payload) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise ImageError(f"{where}: image is larger than {limits.max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: invalid base64 in the data URL") from None
    if len(raw) > limits.max_bytes:
        raise ImageError(f"{where}: image is larger than {limits.max_bytes} bytes")
    return decode_image_bytes(raw, limits, where)


def decode_image_bytes(raw: bytes, limits: ImageLimits, where: str = "image") -> Image.Image:
    if not raw:
        raise ImageError(f"{where}: empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS) as im:
                w, h = im.size
                fmt = im.format
                if w * h > limits.max_pixels:
                    raise ImageError(f"{where}: image has {w}x{h} pixels, more than {limits.max_pixels}")
                frames = getattr(im, "n_frames", 1)
                if frames * w * h > 4 * limits.max_pixels:
                    raise ImageError(f"{where}: animated image has too many frames ({frames})")
                im.load()
                rgb = im.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{where}: image has too many pixels (decompression bomb)") from None
    except Image.DecompressionBombWarning:
        raise ImageError(f"{where}: image has too many pixels (decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{where}: data is not an image in a supported format "
                         f"({', '.join(ALLOWED_FORMATS)})") from None
    except Exception:  # Pillow raises many types on hostile input; all mean "broken image"
        raise ImageError(f"{where}: image data is truncated or corrupt") from None
    if rgb.size != (w, h):
        raise ImageError(f"{where}: {fmt} image changed size while decoding")
    return rgb
