"""Concepts in the official Yo'LLaVA format: `{epoch}-token.pt` and `{epoch}-lmhead.pt`.

The official training script (github.com/WisconsinAIVision/YoLLaVA, `train.py`)
adds `<sks>`, `<token0>`…`<token{k-1}>` to the tokenizer, trains their rows of
the input embedding and the output head, and saves each as one tensor:

    torch.save(model.get_input_embeddings().weight.data[placeholder_token_ids], f"{epoch}-token.pt")
    torch.save(model.lm_head.weight.data[placeholder_token_ids], f"{epoch}-lmhead.pt")

so each file holds a plain tensor of shape `[k+1, d]` (identifier row first,
then the k latents; the model's dtype, often float16), and `test-sks.py` loads
them back with `torch.load` into the rows of a resized model. Here they map
one to one onto a concept's `embed` and `head` (`<name>`, `<name_1>`…`<name_k>`).

Reading uses `torch.load(weights_only=True)` (no code runs) and refuses
anything but one plain 2-D floating-point tensor per file; writing is
`torch.save` of a plain CPU tensor, as the official code writes.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from yollava.concept_model import ConceptRows
from yollava.tokens import ConceptTokens

EPOCH_RE = re.compile(r"^(?:\d+|best)$")
# What torch.load(weights_only=True) raises on a file that is not a tensor file it may read:
# its restricted unpickler's UnpicklingError (pickle's class, reached through torch so that
# nothing here imports pickle), the zip reader's RuntimeError, EOFError on an empty file,
# KeyError / ValueError from the legacy-format reader on other bytes.
_UNREADABLE = (torch.serialization.pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OfficialFormatError(ValueError):
    """An official-format file that must not be used; the message names the file and why."""


def official_paths(folder: str | os.PathLike, epoch: str | int = "best") -> tuple[Path, Path]:
    """(`{epoch}-token.pt`, `{epoch}-lmhead.pt`) in `folder`; `epoch` is a number or `best`."""
    epoch = str(epoch)
    if not EPOCH_RE.fullmatch(epoch):
        raise OfficialFormatError(f"epoch={epoch!r} must be a number or 'best' (the official file names)")
    d = Path(folder)
    return d / f"{epoch}-token.pt", d / f"{epoch}-lmhead.pt"


def official_token_names(sks_name: str, k: int) -> list[str]:
    """The official token strings of a concept, in row order."""
    return [f"<{sks_name}>"] + [f"<token{i}>" for i in range(k)]


@dataclass
class OfficialPair:
    """The two tensors of one official concept, as read (their own dtype), and where they came from."""

    token: Tensor  # (k+1, d): input embedding rows
    lmhead: Tensor  # (k+1, d): output head rows
    token_file: str
    lmhead_file: str
    token_sha256: str
    lmhead_sha256: str

    @property
    def num_latent(self) -> int:
        return self.token.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.token.shape[1]

    def to_rows(self, name: str) -> ConceptRows:
        """The concept `<name>` with these rows (float32)."""
        tokens = ConceptTokens(name, self.num_latent)
        return ConceptRows(tokens, self.token.detach().to(torch.float32).clone(),
                           self.lmhead.detach().to(torch.float32).clone())

    def source(self) -> dict:
        """What an artifact records about where these rows came from."""
        return {"format": "yollava-official", "token_file": self.token_file, "token_sha256": self.token_sha256,
                "lmhead_file": self.lmhead_file, "lmhead_sha256": self.lmhead_sha256,
                "dtype": str(self.token.dtype).removeprefix("torch.")}


def load_official_tensor(path: str | os.PathLike) -> tuple[Tensor, str]:
    """One official file -> (tensor, sha256 of the file); OfficialFormatError for anything else."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise OfficialFormatError(f"{p}: cannot read it: {e}") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except _UNREADABLE as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OfficialFormatError(f"{p}: not a tensor file torch.load(weights_only=True) may read "
                                  f"({type(e).__name__}: {first[:200]})") from None
    if type(obj) not in _PLAIN:
        raise OfficialFormatError(f"{p}: holds a {type(obj).__name__}, expected a plain tensor "
                                  "(the official code saves one tensor per file)")
    t = obj.detach()
    if t.layout != torch.strided or t.is_quantized:
        raise OfficialFormatError(f"{p}: a {t.layout} tensor, expected a dense one")
    if not t.is_floating_point():
        raise OfficialFormatError(f"{p}: dtype {t.dtype}, expected a floating-point tensor")
    if t.dim() != 2 or t.shape[0] < 2 or t.shape[1] < 1:
        raise OfficialFormatError(f"{p}: shape {list(t.shape)}, expected [k+1, d] with k >= 1")
    if not bool(torch.isfinite(t).all()):
        raise OfficialFormatError(f"{p}: holds non-finite values (nan or inf)")
    return t, hashlib.sha256(data).hexdigest()


def read_official(token_file: str | os.PathLike, lmhead_file: str | os.PathLike,
                  hidden_size: int | None = None) -> OfficialPair:
    """Read and check a `{epoch}-token.pt` / `{epoch}-lmhead.pt` pair (against `hidden_size`, if given)."""
    token, token_sha = load_official_tensor(token_file)
    lmhead, lmhead_sha = load_official_tensor(lmhead_file)
    if token.shape != lmhead.shape:
        raise OfficialFormatError(f"{token_file} has shape {list(token.shape)} but {lmhead_file} has "
                                  f"{list(lmhead.shape)}: one concept's two files have the same shape")
    if hidden_size is not None and token.shape[1] != hidden_size:
        raise OfficialFormatError(f"{token_file} has rows of width d={token.shape[1]}; the base model's "
                                  f"hidden size is {hidden_size} (trained on another base?)")
    return OfficialPair(token, lmhead, Path(token_file).name, Path(lmhead_file).name, token_sha, lmhead_sha)


def write_official(rows: ConceptRows, folder: str | os.PathLike, epoch: str | int = "best",
                   dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """Write `rows` as the official code does: `torch.save` of one plain CPU tensor per file."""
    token_path, lmhead_path = official_paths(folder, epoch)
    token_path.parent.mkdir(parents=True, exist_ok=True)
    for path, t in ((token_path, rows.embed), (lmhead_path, rows.head)):
        # a fresh contiguous tensor: torch.save of a view would write its whole storage
        torch.save(t.detach().to("cpu", dtype).contiguous().clone(), path)
    return token_path, lmhead_path
