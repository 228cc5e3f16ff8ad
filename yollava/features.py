"""Frozen work kept once: projected image features per photo, in a byte-bounded LRU.

The vision tower and projector are frozen and a photo never changes, so its
features are computed once and reused by every epoch (trainer) and every
question (evaluator). The cache is bounded by bytes: at LLaVA-1.5-13B a photo
is 576 x 5120 values (5.6 MiB in bf16), so an unbounded cache over a few
hundred negatives would hold gigabytes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Sequence, TypeVar

import torch
from PIL import Image, ImageOps
from torch import Tensor

from yollava.backbone import Backbone
from yollava.recipe import PhotoRef

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
ImageLoader = Callable[[str], Image.Image]


def nbytes(value) -> int:
    """Bytes held by a tensor or a nested list/tuple of tensors."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    return sum(nbytes(v) for v in value)


class ByteLRU(Generic[K, V]):
    """Least-recently-used values up to `budget_bytes`; a value larger than the budget is not kept."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes} must be >= 0")
        self.budget = budget_bytes
        self.used = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V:
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: K, value: V) -> None:
        size = nbytes(value)
        if key in self._items:
            self.used -= self._items.pop(key)[1]
        if size > self.budget:
            return
        while self.used + size > self.budget:
            _, (_, old) = self._items.popitem(last=False)
            self.used -= old
        self._items[key] = (value, size)
        self.used += size


class FeatureCache:
    """Projected image features per (photo, flip), computed once while they fit `budget_mb`."""

    def __init__(self, backbone: Backbone, load: ImageLoader, batch_size: int = 16, budget_mb: int = 2048):
        self.backbone, self.load, self.batch_size = backbone, load, batch_size
        self._feats: ByteLRU[PhotoRef, Tensor] = ByteLRU(budget_mb * 2**20)
        self.computed = 0

    def get(self, refs: Sequence[PhotoRef]) -> Tensor:
        """(N,) refs -> (N, n_img, d) features."""
        have = {r: self._feats.get(r) for r in dict.fromkeys(refs) if r in self._feats}
        missing = [r for r in dict.fromkeys(refs) if r not in have]
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i:i + self.batch_size]
            photos = [self._photo(r) for r in chunk]
            feats = self.backbone.image_features(self.backbone.preprocess(photos))  # (n, n_img, d)
            for r, f in zip(chunk, feats):
                f = f.clone()  # its own storage, so the byte count is honest
                have[r] = f
                self._feats.put(r, f)
            self.computed += len(chunk)
        return torch.stack([have[r] for r in refs])

    def _photo(self, ref: PhotoRef) -> Image.Image:
        im = self.load(ref.key).convert("RGB")
        return ImageOps.mirror(im) if ref.flip else im
