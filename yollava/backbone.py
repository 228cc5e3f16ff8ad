"""Frozen LLaVA-family backbones: load by Hugging Face id, local path, or `tiny`."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TINY = "tiny"
# Short names for checkpoints that ship with the project: name -> Hugging Face folder.
MODEL_ALIASES: dict[str, Path] = {
    "mini": Path(__file__).resolve().parents[1] / "models" / "mini",  # written by `python -m miniworld.pretrain`
}
SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class BackboneError(RuntimeError):
    """A checkpoint that cannot be used as a backbone (missing, wrong type, broken)."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}") from None


@dataclass
class Backbone:
    """A frozen LLaVA model with its tokenizer and image processor.

    `vocab_size` is the number of rows of the base embedding and head: concept
    tokens get virtual ids from there on, so nothing in the model is resized.
    """

    model_id: str
    model: nn.Module
    tokenizer: object
    image_processor: object
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        self.model.requires_grad_(False)
        self.model.eval()
        if not self.fingerprint:
            self.fingerprint = fingerprint_weights(self.model)

    @property
    def config(self):
        return self.model.config

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.lm_head.weight.shape[1]

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per photo for fixed-resolution LLaVA-1.5 towers."""
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        return n if strategy == "default" else n + 1

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features, (N, 3, H, W) -> (N, n_img, d). Frozen: no grad."""
        pixel_values = pixel_values.to(self.device, self.model.model.vision_tower.dtype)
        out = self.model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return torch.stack(list(out.pooler_output)).to(self.dtype)  # (N, n_img, d)

    def preprocess(self, images: list) -> torch.Tensor:
        """PIL images -> pixel values (N, 3, H, W) for this backbone's vision tower."""
        if not images:
            raise ValueError("preprocess needs at least one image")
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def fingerprint_weights(model: nn.Module, stride: int = 4099) -> str:
    """A cheap fingerprint of a model's weights: names, shapes and a strided sample.

    Hashing every weight of a 13B model would take tens of seconds; a prime
    stride over every tensor still tells two checkpoints (or two seeds) apart.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[::stride].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def load_backbone(model_id: str, dtype: str | torch.dtype | None = None,
                  device: str | torch.device = "cpu", seed: int = 0) -> Backbone:
    """Load a LLaVA backbone by Hugging Face id, local path, alias (`mini`), or `tiny` (random, built here)."""
    torch_dtype = resolve_dtype(dtype)
    if model_id == TINY:
        from yollava.tiny import build_tiny_llava

        model, tokenizer, processor = build_tiny_llava(seed=seed)
        return Backbone(TINY, model.to(device=device, dtype=torch_dtype), tokenizer, processor)
    if model_id in MODEL_ALIASES:
        path = MODEL_ALIASES[model_id]
        if not (path / "config.json").is_file():
            raise BackboneError(f"model={model_id!r} is an alias for {path}, which holds no checkpoint "
                                f"(no config.json; `python -m miniworld.pretrain --out {path}` writes the mini one)")
        backbone = _load_pretrained(str(path), torch_dtype, device)
        backbone.model_id = model_id
        return backbone
    return _load_pretrained(model_id, torch_dtype, device)


def _load_pretrained(model_id: str, dtype: torch.dtype, device) -> Backbone:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    import transformers

    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        hint = "" if os.path.isdir(model_id) else " (no download happens without network access; pass a local path)"
        raise BackboneError(f"cannot read a model config for model={model_id!r}{hint}: {e}") from e
    archs = list(getattr(config, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise BackboneError(
            f"model={model_id!r} has architectures={archs}; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    if arch == "LlavaNextForConditionalGeneration":
        # LLaVA-NeXT's any-resolution tiling gives a variable number of image
        # tokens per photo; the concept path here assumes a fixed count.
        raise BackboneError(
            f"model={model_id!r} is LLaVA-NeXT, not supported yet: its any-resolution tiling "
            "gives a variable number of image tokens per photo; use a LLaVA-1.5 checkpoint"
        )
    cls = getattr(transformers, arch)
    try:
        model = cls.from_pretrained(model_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        processor = AutoImageProcessor.from_pretrained(model_id)
    except OSError as e:
        raise BackboneError(f"checkpoint model={model_id!r} is incomplete or unreadable: {e}") from e
    return Backbone(model_id, model.to(device), tokenizer, processor)
