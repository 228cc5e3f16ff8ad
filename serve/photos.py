"""Photos shrunk at the ingress to what the model's vision tower takes.

A 4096x4096 photo is 48 MiB of pixels; the tower of LLaVA-1.5 takes 336x336,
tiny's 32x32. `PhotoFit` runs the model's own image processor with rescaling
and normalization off, so its resize and crop happen once, here, on the
photo's 8-bit pixels; the model's processor then finds a photo already of its
size, and its pixel values are exactly those of the original photo (a test
checks equality). A photo the model cannot take (a processor that does not
resize, given another size) is refused here with both sizes named.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from serve.images import ImageError


@dataclass
class PhotoFit:
    processor: object  # the model's image processor (picklable: it travels from the model replica)
    size: tuple[int, int]  # (height, width) of the vision tower's input

    @classmethod
    def for_backbone(cls, backbone) -> "PhotoFit":
        vc = backbone.config.vision_config
        fit = cls(backbone.image_processor, (vc.image_size, vc.image_size))
        probe = fit.pixels(Image.new("RGB", fit.size[::-1]))  # a photo of the tower's own size
        if probe.dtype != torch.uint8:
            raise ValueError(f"image processor {type(fit.processor).__name__} gives {probe.dtype} pixels with "
                             "rescaling and normalization off; PhotoFit needs its resize and crop on 8-bit pixels")
        return fit

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) 8-bit pixels after the processor's resize and crop, before anything else."""
        out = self.processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="pt")
        return out["pixel_values"][0]

    def __call__(self, image: Image.Image, where: str = "image") -> Image.Image:
        px = self.pixels(image)
        if tuple(px.shape[-2:]) != self.size:
            (h, w), (th, tw) = px.shape[-2:], self.size
            raise ImageError(f"{where}: image of {image.width}x{image.height} pixels becomes {w}x{h} for this "
                             f"model, whose vision tower takes {tw}x{th}")
        return Image.fromarray(px.permute(1, 2, 0).contiguous().numpy())  # (H, W, 3) uint8
