"""The miniature LLaVA: a word-level tokenizer and small CLIP + Llama configs.

A real `LlavaForConditionalGeneration`; the tokenizer is a `tokenizers`
WordLevel model wrapped in `PreTrainedTokenizerFast`, lower-casing and
splitting punctuation, so `add_tokens`, special tokens and decoding behave
like the real ones. Weights ship in `models/mini/`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast)

from miniworld import world
from yollava import templates
from yollava.backbone import MODEL_ALIASES
from yollava.prompt import SYSTEM_PROMPT

WEIGHTS = MODEL_ALIASES["mini"]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
EXTRA_WORDS = """yes no there is are a an the this that photo image picture in of and or what which how many
where colour color shape pattern object objects thing things main subject describe it its one two three four
five six seven eight nine zero none empty top bottom middle left right centre center cell grid kind size small
big material made look looks like has have with without markings distinctive notch corner plain striped dotted
stripes dots sentence detail most stands out about round flat paint painted i see can cannot not do does
answer option letter from given choices directly a b understood that's first second is the". ,?!:;'-()<>/_"""


def vocabulary() -> list[str]:
    words: dict[str, None] = {}
    corpus = [SYSTEM_PROMPT, "USER ASSISTANT", EXTRA_WORDS, *world.SHAPES, *world.COLOURS, *world.PATTERNS,
              *world.POSITIONS, *templates.RECOGNITION_QUESTIONS, *templates.YES_ANSWERS,
              *templates.NO_ANSWERS, templates.RECOGNITION_EVAL_QUESTION,
              *(q for pair in templates.ATTRIBUTE_QUESTIONS for q in pair)]
    for text in corpus:
        for w in re.findall(r"\w+|[^\w\s]", text.replace("{c}", " ").lower()):
            words.setdefault(w, None)
    return SPECIALS + sorted(words)


def build_mini_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def build_mini_config(tokenizer, text_hidden: int = 256, text_layers: int = 4) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=world.SIZE, patch_size=world.CELL, projection_dim=128)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=text_layers, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=False)


def build_mini_image_processor() -> CLIPImageProcessor:
    # the world's pixels as they are: no resize, no crop; CLIP's normalisation
    return CLIPImageProcessor(do_resize=False, do_center_crop=False,
                              size={"shortest_edge": world.SIZE},
                              crop_size={"height": world.SIZE, "width": world.SIZE})


def build_mini_llava(seed: int = 0):
    tokenizer = build_mini_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(build_mini_config(tokenizer))
    return model, tokenizer, build_mini_image_processor()


def save_mini(model: LlavaForConditionalGeneration, out: Path) -> None:
    """The model, its tokenizer and image processor as a Hugging Face folder (loads by path)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    build_mini_tokenizer().save_pretrained(out)
    build_mini_image_processor().save_pretrained(out)
