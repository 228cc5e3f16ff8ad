import json

import pytest
import torch

from yollava.backbone import BackboneError, load_backbone


def test_tiny_by_name_is_frozen_and_deterministic(tiny):
    assert all(not p.requires_grad for p in tiny.model.parameters())
    again = load_backbone("tiny")
    assert again.fingerprint == tiny.fingerprint
    assert load_backbone("tiny", seed=1).fingerprint != tiny.fingerprint


def test_dtype_option():
    bb = load_backbone("tiny", dtype="bfloat16")
    assert bb.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int3'"):
        load_backbone("tiny", dtype="int3")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="model="):
        load_backbone(str(tmp_path / "nope"))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8}))
    with pytest.raises(BackboneError, match="LlamaForCausalLM"):
        load_backbone(str(tmp_path))


def test_saved_checkpoint_loads_by_path(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    tiny.image_processor.save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    assert bb.fingerprint == tiny.fingerprint
    assert bb.num_image_tokens == tiny.num_image_tokens
