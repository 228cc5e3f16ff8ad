"""A tiny LLaVA built from a config in code: the `tiny` backbone of the tests.

No download: the tokenizer is a byte-level BPE trained here on a fixed corpus
(so every string tokenizes), and the weights are random from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TINY_IMAGE_SIZE = 32
TINY_PATCH = 8  # (32/8)^2 = 16 image tokens per photo

_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: Is in this photo? Yes, it is. No, it is not. Can you see it in the image?",
    "What colour is it? What shape? Describe the texture, the markings and the size.",
    "the a an of and to in is it this that photo image picture red green blue yellow "
    "white black round square small large dog cat mug person answer question",
]


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama-like special tokens, trained in code."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


@dataclass(frozen=True)
class TinySizes:
    """Shapes of a small LLaVA; the defaults are the `tiny` test backbone."""

    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = TINY_IMAGE_SIZE
    patch: int = TINY_PATCH
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int | None = None  # None: the tokenizer's size; larger leaves unused rows


def build_tiny_config(vocab_size: int, image_token_id: int, pad_token_id: int,
                      sizes: TinySizes = TinySizes()) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=2 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch,
        projection_dim=sizes.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=sizes.vocab_size or vocab_size,
        hidden_size=sizes.text_hidden,
        intermediate_size=2 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=2048,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_tiny_image_processor(size: int = TINY_IMAGE_SIZE) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_tiny_llava(seed: int = 0, sizes: TinySizes = TinySizes()):
    """(model, tokenizer, image_processor) of a random small LLaVA, deterministic in `seed`."""
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        sizes=sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.eval()
    return model, tokenizer, build_tiny_image_processor(sizes.image_size)
