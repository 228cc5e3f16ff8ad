"""The negative pool: images to draw negatives from, and an index to mine the hard ones.

`build_pool` embeds every image of a folder once (the backbone's own vision
tower, or open_clip) into a faiss index whose ids are the image paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from yollava.backbone import Backbone
from yollava.data import list_images, load_image
from yollava.mining import ImageEncoder, OpenClipEncoder, PoolIndex, VisionTowerEncoder


@dataclass
class NegativePool:
    """Pool images for negatives: ids (loader keys), and an index to mine hard ones."""

    ids: list[str] = field(default_factory=list)
    index: PoolIndex | None = None
    encoder: ImageEncoder | None = None


def make_encoder(spec: str, backbone: Backbone) -> ImageEncoder:
    """`vision-tower` (the backbone's own CLIP tower) or `open_clip:MODEL[:WEIGHTS_PATH]`."""
    if spec == "vision-tower":
        return VisionTowerEncoder(backbone)
    if spec.startswith("open_clip:"):
        _, model, *weights = spec.split(":", 2)
        return OpenClipEncoder(model, pretrained=weights[0] if weights else None)
    raise ValueError(f"encoder={spec!r}: use 'vision-tower' or 'open_clip:MODEL[:WEIGHTS_PATH]'")


def build_pool(pool_dir: str | Path | None, backbone: Backbone, encoder_spec: str = "vision-tower",
               batch: int = 32) -> NegativePool:
    """Embed every image of `pool_dir` once into a faiss index (ids are file paths); none -> empty pool."""
    if not pool_dir:
        return NegativePool()
    paths = [str(p) for p in list_images(Path(pool_dir))]
    if not paths:
        raise ValueError(f"negative pool {str(pool_dir)!r} holds no images")
    encoder = make_encoder(encoder_spec, backbone)
    embs = [encoder.embed([load_image(p) for p in paths[i:i + batch]]) for i in range(0, len(paths), batch)]
    index = PoolIndex.build(np.concatenate(embs), paths, encoder=encoder.name)
    return NegativePool(paths, index, encoder)
