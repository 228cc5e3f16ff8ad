"""LLaVA-1.5-shaped checkpoints with random weights and the real vocabulary.

What `llava-hf/llava-1.5-7b-hf` / `-13b-hf` look like, without the weights:
the Llama 2 tokenizer with `<image>` = 32000 and `<pad>` = 32001 (32,002
tokens), embedding and head padded to 32,064 rows as in the HF checkpoints, a
CLIP ViT-L/14-336-style tower (or a smaller one), the CLIP image-processor
config of LLaVA-1.5, and a `LlavaProcessor` config that expands `<image>` to
(336/14)^2 = 576 image tokens. Small shapes are for tests and the CPU; the
7b / 13b shapes are for `bench/gpu` (built on the GPU, never saved).

    python -m yollava.checkpoints --tokenizer tests/data/llama2-tokenizer/llava-1.5 --out DIR [--shape tiny]
        [--seed 0] [--hub-cache DIR --repo-id ORG/NAME]

`--hub-cache` also lays the folder out as the Hugging Face hub cache does
(`models--org--name/{blobs,snapshots/<rev>,refs/main}`), so the id loads with
`HF_HUB_OFFLINE=1 HF_HUB_CACHE=DIR`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REAL_VOCAB_ROWS = 32064  # 32,000 pieces + <image> + <pad>, padded to a multiple of 64
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<image>", 32000
PAD_TOKEN, PAD_TOKEN_ID = "<pad>", 32001
TOKENIZER_SIZE = 32002
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class LlavaShape:
    """Sizes of a LLaVA-1.5 model; `vocab` rows of embedding and head."""

    name: str
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None  # None: as many as heads (LLaVA-1.5 has no GQA)
    vocab: int = REAL_VOCAB_ROWS
    projection_dim: int = 768
    max_positions: int = 4096

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


SHAPES = {
    "7b": LlavaShape("llava-1.5-7b", 1024, 24, 16, 4096, 336, 14, 4096, 32, 32, 11008),
    "13b": LlavaShape("llava-1.5-13b", 1024, 24, 16, 4096, 336, 14, 5120, 40, 40, 13824),
    # the real image geometry (576 image tokens) on a model small enough for a test
    "tiny": LlavaShape("llava-1.5-tiny", 32, 2, 2, 64, 336, 14, 64, 2, 4, 128),
    # bench/gpu's CPU run: a smaller photo (16 image tokens), a wider text model
    "small": LlavaShape("llava-1.5-small", 64, 2, 2, 256, 56, 14, 128, 2, 4, 256),
}


class CheckpointError(ValueError):
    """A tokenizer or shape that cannot make a LLaVA-1.5 checkpoint; the message names the value."""


def load_llava15_tokenizer(path: str | os.PathLike):
    """The LLaVA-1.5 tokenizer at `path` (a folder with tokenizer.json), checked to be the real one."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer={str(p)!r} has no tokenizer.json "
                              "(expected the converted LLaVA-1.5 tokenizer, e.g. tests/data/llama2-tokenizer/llava-1.5)")
    tok = AutoTokenizer.from_pretrained(str(p))
    found = {"len": len(tok), IMAGE_TOKEN: tok.convert_tokens_to_ids(IMAGE_TOKEN), "pad": tok.pad_token_id,
             "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    want = {"len": TOKENIZER_SIZE, IMAGE_TOKEN: IMAGE_TOKEN_ID, "pad": PAD_TOKEN_ID, "bos": 1, "eos": 2}
    if found != want:
        bad = {k: v for k, v in found.items() if want[k] != v}
        raise CheckpointError(f"tokenizer={str(p)!r} is not the LLaVA-1.5 tokenizer: {bad} "
                              f"(expected {({k: want[k] for k in bad})})")
    return tok


def llava15_config(shape: LlavaShape):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if shape.vocab < TOKENIZER_SIZE:
        raise CheckpointError(f"shape {shape.name!r} has vocab={shape.vocab} rows; the tokenizer needs "
                              f"at least {TOKENIZER_SIZE}")
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch,
                              projection_dim=shape.projection_dim, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads or shape.heads,
                       max_position_embeddings=shape.max_positions, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    config.pad_token_id = PAD_TOKEN_ID
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def llava15_image_processor(image_size: int = 336):
    """LLaVA-1.5's CLIP preprocessing: resize the short side (bicubic), center-crop, CLIP mean/std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
                              do_convert_rgb=True, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def llava15_processor(tokenizer, image_processor, shape: LlavaShape):
    """The HF `LlavaProcessor` as the llava-hf checkpoints configure it (576 image tokens at 336/14)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape.patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_llava15(shape: LlavaShape | str, tokenizer_dir: str | os.PathLike, seed: int = 0,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, image_processor): random weights made directly on `device` in `dtype`."""
    from transformers import LlavaForConditionalGeneration

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    tokenizer = load_llava15_tokenizer(tokenizer_dir)
    config = llava15_config(shape)
    prev = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlavaForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(prev)
    model.eval()
    return model, tokenizer, llava15_image_processor(shape.image_size)


def build_llava15_backbone(shape: LlavaShape | str, tokenizer_dir: str | os.PathLike, seed: int = 0,
                           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A `Backbone` of a random LLaVA-1.5-shaped model with the real tokenizer, without a folder."""
    from yollava.backbone import Backbone

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    model, tok, proc = build_llava15(shape, tokenizer_dir, seed, device, dtype)
    return Backbone(shape.name, model, tok, proc)


def save_llava15(out: str | os.PathLike, shape: LlavaShape | str, tokenizer_dir: str | os.PathLike,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a checkpoint folder as the llava-hf repositories hold one (`save_pretrained` of model and processor)."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    model, tok, image_processor = build_llava15(shape, tokenizer_dir, seed, "cpu", dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor = llava15_processor(tok, image_processor, shape)
    processor.save_pretrained(out)  # tokenizer, image processor, processor config
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "yollava-shape.json").write_text(json.dumps({**asdict(shape), "seed": seed}, indent=2) + "\n")
    return out


def install_in_hub_cache(folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike,
                         revision: str | None = None) -> Path:
    """Lay `folder`'s files out as the hub cache holds a downloaded repo; return the snapshot folder.

    `cache_dir/models--{org}--{name}/blobs/<sha256>` with the bytes,
    `snapshots/<revision>/<file>` relative symlinks to them and `refs/main`
    naming the revision, so `from_pretrained(repo_id)` finds it offline.
    """
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"repo_id={repo_id!r} must be 'org/name'")
    src = Path(folder)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise CheckpointError(f"folder={str(src)!r} holds no files")
    if revision is None:
        h = hashlib.sha1()
        for p in files:
            h.update(p.relative_to(src).as_posix().encode() + b"\0" + p.read_bytes())
        revision = h.hexdigest()
    repo = Path(cache_dir) / f"models--{parts[0]}--{parts[1]}"
    snapshot = repo / "snapshots" / revision
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m yollava.checkpoints", description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="the converted LLaVA-1.5 tokenizer folder")
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hub-cache", help="also install the folder into this hub cache folder (HF_HUB_CACHE)")
    ap.add_argument("--repo-id", help="the id it has there, e.g. llava-hf/llava-1.5-7b-hf")
    args = ap.parse_args(argv)
    if bool(args.hub_cache) != bool(args.repo_id):
        ap.error("--hub-cache and --repo-id go together")
    out = save_llava15(args.out, args.shape, args.tokenizer, args.seed)
    report = {"checkpoint": str(out), "shape": args.shape, "vocab_rows": SHAPES[args.shape].vocab,
              "image_tokens": SHAPES[args.shape].num_image_tokens}
    if args.hub_cache:
        report["hub_snapshot"] = str(install_in_hub_cache(out, args.repo_id, args.hub_cache))
        report["repo_id"] = args.repo_id
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
