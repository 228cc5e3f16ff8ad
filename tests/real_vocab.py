"""The LLaVA-1.5-shaped checkpoint with the real tokenizer, built once per test process.

Random weights at a tiny width, the real vocabulary (32,064 rows), the real
image geometry (576 image tokens per photo), saved with `save_pretrained` and
loaded back by path as a user's `--model DIR` would be.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from yollava.backbone import Backbone, load_backbone
from yollava.checkpoints import save_llava15

REAL_TOKENIZER = Path(__file__).resolve().parent / "data" / "llama2-tokenizer" / "llava-1.5"


@functools.lru_cache(maxsize=None)
def llava15_folder() -> Path:
    root = Path(tempfile.mkdtemp(prefix="yollava-llava15-"))
    atexit.register(shutil.rmtree, root, True)
    return save_llava15(root / "llava-1.5-tiny", "tiny", REAL_TOKENIZER, seed=0)


@functools.lru_cache(maxsize=None)
def llava15_backbone() -> Backbone:
    """Shared: tests must not change its weights (build_llava15_backbone makes a private one)."""
    return load_backbone(str(llava15_folder()))
