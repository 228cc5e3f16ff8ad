"""Concept artifacts: safetensors (`embed`, `head`, each (k+1, d)) + a JSON manifest.

Never pickle. Loading validates everything before returning a tensor: format
version, fields, shapes, the sha256 of the tensors and of the manifest itself,
and (when given) the base model the concept was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from yollava.concept_model import ConceptRows
from yollava.tokens import ConceptTokens, check_name

FORMAT_VERSION = 1
TENSORS_FILE = "concept.safetensors"
MANIFEST_FILE = "manifest.json"
_REQUIRED = ("format_version", "owner", "name", "version", "tokens", "base_model",
             "base_fingerprint", "recipe", "metrics", "created", "shape", "tensors_sha256",
             "manifest_sha256")


class ArtifactError(ValueError):
    """A concept artifact that must not be used; the message says why."""


@dataclass
class ConceptArtifact:
    owner: str
    rows: ConceptRows
    base_model: str
    base_fingerprint: str
    version: int = 1
    recipe: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = ""
    # where the rows came from when not trained here (e.g. the official format's files and their
    # sha256); {} for a concept trained by this code. Optional in a manifest: older ones have none.
    source: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.rows.tokens.name

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(tensors, manifest) as bytes: the two objects a store writes, tensors first."""
        check_name(self.owner, "owner")
        if self.version < 1:
            raise ArtifactError(f"version={self.version} must be >= 1")
        if not isinstance(self.source, dict):
            raise ArtifactError(f"source={self.source!r} must be a dict")
        embed = self.rows.embed.detach().to("cpu", torch.float32).contiguous()
        head = self.rows.head.detach().to("cpu", torch.float32).contiguous()
        tensors = st_save({"embed": embed, "head": head})
        manifest = {
            "format_version": FORMAT_VERSION,
            "owner": self.owner,
            "name": self.name,
            "version": self.version,
            "tokens": self.rows.tokens.strings,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "recipe": self.recipe,
            "metrics": self.metrics,
            "created": self.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": self.source,
            "shape": list(embed.shape),
            "tensors_sha256": _tensor_digest(embed, head),
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        return tensors, json.dumps(manifest, indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, tensors: bytes, manifest: bytes,
                   expect_fingerprint: str | None = None) -> "ConceptArtifact":
        m = _parse_manifest(manifest)
        if expect_fingerprint is not None and m["base_fingerprint"] != expect_fingerprint:
            raise ArtifactError(
                f"concept {m['owner']}/{m['name']} was trained on base_model={m['base_model']!r} "
                f"(fingerprint {m['base_fingerprint']}), not on the loaded base (fingerprint {expect_fingerprint})")
        try:
            t = st_load(tensors)
        except (SafetensorError, Exception) as e:  # noqa: BLE001 - any parse failure is a refusal
            raise ArtifactError(f"concept {m['owner']}/{m['name']}: tensors file is unreadable: {e}") from e
        if set(t) != {"embed", "head"}:
            raise ArtifactError(f"concept {m['owner']}/{m['name']}: tensors are {sorted(t)}, expected ['embed', 'head']")
        for key in ("embed", "head"):
            if list(t[key].shape) != m["shape"]:
                raise ArtifactError(f"concept {m['owner']}/{m['name']}: {key} has shape {list(t[key].shape)}, "
                                    f"manifest says {m['shape']}")
        if _tensor_digest(t["embed"], t["head"]) != m["tensors_sha256"]:
            raise ArtifactError(f"concept {m['owner']}/{m['name']}: tensors sha256 does not match the manifest "
                                "(tampered or corrupted)")
        tokens = ConceptTokens(m["name"], m["shape"][0] - 1)
        if tokens.strings != m["tokens"]:
            raise ArtifactError(f"concept {m['owner']}/{m['name']}: token strings {m['tokens'][:3]}… do not match "
                                f"name and shape")
        rows = ConceptRows(tokens, t["embed"], t["head"])
        return cls(m["owner"], rows, m["base_model"], m["base_fingerprint"], m["version"],
                   m["recipe"], m["metrics"], m["created"], m.get("source", {}))


def save_concept(directory: str | os.PathLike, artifact: ConceptArtifact) -> Path:
    """Write tensors, then the manifest, each atomically (temp file + rename)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, manifest = artifact.to_bytes()
    atomic_write(d / TENSORS_FILE, tensors)
    atomic_write(d / MANIFEST_FILE, manifest)
    return d


def load_concept(directory: str | os.PathLike, expect_fingerprint: str | None = None) -> ConceptArtifact:
    d = Path(directory)
    if not (d / MANIFEST_FILE).is_file():
        raise ArtifactError(f"no {MANIFEST_FILE} in {d}: not a concept (or an unfinished write)")
    if not (d / TENSORS_FILE).is_file():
        raise ArtifactError(f"no {TENSORS_FILE} in {d}")
    return ConceptArtifact.from_bytes((d / TENSORS_FILE).read_bytes(), (d / MANIFEST_FILE).read_bytes(),
                                      expect_fingerprint)


def atomic_write(path: Path, data: bytes | Callable[[IO[bytes]], object]) -> Path:
    """Write `data` (bytes, or a function writing to a file) beside `path`, fsync, rename over it.

    The temp file's name starts with a dot, so listings that skip hidden names never see it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _tensor_digest(embed: torch.Tensor, head: torch.Tensor) -> str:
    h = hashlib.sha256()
    for name, t in (("embed", embed), ("head", head)):
        t = t.to(torch.float32).contiguous()
        h.update(f"{name}:{list(t.shape)}:float32:".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _parse_manifest(raw: bytes) -> dict:
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"manifest is not valid JSON: {e}") from e
    if not isinstance(m, dict):
        raise ArtifactError("manifest is not a JSON object")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ArtifactError(f"manifest lacks fields {missing}")
    if m["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"manifest format_version={m['format_version']!r}; this code reads {FORMAT_VERSION}")
    if _manifest_digest(m) != m["manifest_sha256"]:
        raise ArtifactError(f"manifest of {m.get('owner')}/{m.get('name')} was edited: its manifest_sha256 "
                            "does not match its content")
    try:
        check_name(m["owner"], "owner")
        check_name(m["name"], "name")
    except ValueError as e:
        raise ArtifactError(str(e)) from e
    shape = m["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape)
            and shape[0] >= 2):
        raise ArtifactError(f"manifest shape={shape!r} must be [k+1, d] with k >= 1")
    if not isinstance(m["version"], int) or m["version"] < 1:
        raise ArtifactError(f"manifest version={m['version']!r} must be a positive integer")
    if not isinstance(m.get("source", {}), dict):
        raise ArtifactError(f"manifest source={m['source']!r} must be an object")
    return m
