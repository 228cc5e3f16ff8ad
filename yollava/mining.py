"""Hard-negative mining: the pool images most like a subject, minus its near-duplicates.

An image encoder (open_clip, or the backbone's own CLIP vision tower) embeds a
pool once into a faiss index of L2-normalised rows, so inner product is cosine.
Each subject's photos query it for the `m` most similar pool images that are
not near-duplicates of the photos themselves: Yo'LLaVA's hard negatives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import faiss
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from yollava.artifacts import atomic_write
from yollava.backbone import Backbone, fingerprint_weights

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
KINDS = ("auto", "flat", "ivf")
POOLINGS = ("pooled", "mean")
_REQUIRED = ("format_version", "ids", "encoder", "dim", "kind", "key", "index_sha256")
_NORM_TOL = 1e-3


class PoolIndexError(ValueError):
    """A saved pool index that must not be used; the message says why."""


# ---------------------------------------------------------------- encoders


class ImageEncoder(Protocol):
    """Images -> (N, D) float32 L2-normalised rows. `name` names encoder + weights (a cache key)."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...


class _BatchedEncoder:
    """Shared by the encoders: `name`, `dim`, and `embed` batch by batch over `_forward`."""

    batch_size: int
    _name: str
    _dim: int

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """N PIL images -> (N, dim) float32, L2-normalised rows."""
        out = [np.zeros((0, self._dim), np.float32)]
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = [im if im.mode == "RGB" else im.convert("RGB") for im in images[i:i + self.batch_size]]
                feats = F.normalize(self._forward(batch).float(), dim=-1)  # (B, D)
                out.append(feats.cpu().numpy())
        return np.concatenate(out)

    def _forward(self, batch: list[Image.Image]) -> torch.Tensor:  # B RGB images -> (B, D)
        raise NotImplementedError


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    return batch_size


class OpenClipEncoder(_BatchedEncoder):
    """The image tower of a built-in open_clip model (`open_clip.list_models()`).

    `pretrained` is a local full-CLIP weights file, or None for a random init
    from `seed`. Nothing downloads: pretrained tags (`"openai"`), `hf-hub:` names
    and models whose text tower is a Hugging Face model are refused.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32, seed: int = 0):
        cfg = _local_open_clip_config(model_name, pretrained)
        self.batch_size = _check_batch_size(batch_size)
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):  # seed the init, leave the caller's RNG alone
            torch.manual_seed(seed)
            model, _, self._preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=self.device)
        self._visual = model.visual.eval().requires_grad_(False)  # the text tower is dropped
        self._dim = int(cfg["embed_dim"])
        self._name = f"open_clip:{model_name}:{fingerprint_weights(self._visual)}"

    def _forward(self, batch: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self._preprocess(im) for im in batch]).to(self.device)  # (B, 3, H, W)
        return self._visual(pixels)  # (B, dim)


def _local_open_clip_config(model_name: str, pretrained: str | None) -> dict:
    """The built-in config of `model_name`, after refusing anything that would download."""
    if model_name not in open_clip.list_models():  # before get_model_config: it fetches hf-hub: names
        raise ValueError(f"model_name={model_name!r} is not a built-in open_clip model "
                         "(see open_clip.list_models()); hub models are not supported")
    cfg = open_clip.get_model_config(model_name)
    if "hf_model_name" in cfg.get("text_cfg", {}):
        raise ValueError(f"model_name={model_name!r} has a Hugging Face text tower whose config "
                         "would be downloaded; pick a model with a built-in text tower")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ValueError(f"pretrained={pretrained!r} is not a local weights file; pretrained tags "
                         "download and are refused (pass a file path, or None for a random init)")
    return cfg


class VisionTowerEncoder(_BatchedEncoder):
    """The backbone's own frozen CLIP vision tower.

    `pooling="pooled"`: the post-layernorm CLS state; `"mean"`: the mean of the
    last hidden states of the patches. Either is in the tower's hidden size,
    not in CLIP's joint space (LLaVA keeps no visual projection).
    """

    def __init__(self, backbone: Backbone, pooling: str = "pooled", batch_size: int = 32):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {list(POOLINGS)}")
        self.batch_size = _check_batch_size(batch_size)
        self.pooling = pooling
        self._backbone = backbone
        self._tower = backbone.model.model.vision_tower
        self._dim = backbone.config.vision_config.hidden_size
        self._name = f"vision_tower:{backbone.model_id}:{backbone.fingerprint}:{pooling}"

    def _forward(self, batch: list[Image.Image]) -> torch.Tensor:
        pixels = self._backbone.preprocess(batch).to(self._tower.device, self._tower.dtype)  # (B, 3, H, W)
        out = self._tower(pixel_values=pixels)
        if self.pooling == "pooled":
            return out.pooler_output  # (B, dim)
        return out.last_hidden_state[:, 1:].mean(dim=1)  # (B, 1 + n_patch, dim) -> (B, dim), CLS left out


# ---------------------------------------------------------------- the pool index


def check_embeddings(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    """(N, D) L2-normalised rows, N >= 1, as C-contiguous float32 (what faiss takes)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} has shape {x.shape}; expected (N, D) with N, D >= 1")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} has dim {x.shape[1]}; the index has dim {dim}")
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1) <= _NORM_TOL))  # NaN counts as bad
    if bad.size:
        raise ValueError(f"{what} row {bad[0]} has norm {norms[bad[0]]:.4f}; rows must be "
                         "L2-normalised so inner product is cosine")
    return np.ascontiguousarray(x)


@dataclass
class PoolIndex:
    """A faiss inner-product index over a pool's unit embeddings, `ids[row]` naming each row.

    `encoder` is the name of the encoder that made the embeddings, `key` the
    pool's content key (see `pool_key`): together they say when it can be reused.
    """

    index: faiss.Index
    ids: list[str]
    encoder: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        self.ids = list(self.ids)
        if len(self.ids) != self.index.ntotal:
            raise PoolIndexError(f"{len(self.ids)} ids for an index of {self.index.ntotal} vectors")
        if len(set(self.ids)) != len(self.ids):
            raise PoolIndexError(f"duplicate ids, e.g. {_first_duplicate(self.ids)!r}")
        if self.index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise PoolIndexError(f"index metric_type={self.index.metric_type}; expected inner product")
        _kind_of(self.index)

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: Sequence[str], encoder: str = "", key: str = "",
              kind: str = "auto", ivf_threshold: int = 10_000, nlist: int | None = None,
              nprobe: int | None = None) -> "PoolIndex":
        """Index (N, D) unit embeddings: exact flat, or IVF when `kind="auto"` and N > ivf_threshold.

        IVF: `nlist` lists (default ~4 sqrt(N), at most N/39 so k-means is trained),
        `nprobe` of them searched per query (default nlist/4; nprobe = nlist is exact).
        """
        x = check_embeddings(embeddings, "embeddings")
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} embeddings")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {list(KINDS)}")
        if kind == "auto":
            kind = "ivf" if len(x) > ivf_threshold else "flat"
        index = faiss.IndexFlatIP(x.shape[1]) if kind == "flat" else _ivf(x, nlist, nprobe)
        index.add(x)
        return cls(index, list(ids), encoder, key)

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def size(self) -> int:
        return self.index.ntotal

    @property
    def kind(self) -> str:
        return _kind_of(self.index)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """(Q, D) unit queries -> per query, up to k (id, cosine), best first."""
        q = check_embeddings(queries, "queries", self.dim)
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        scores, rows = self.index.search(q, min(k, self.size))  # (Q, k) each; row -1: no result
        return [[(self.ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(index, manifest) as bytes: the faiss file and ids.json, the two objects a store writes."""
        blob = faiss.serialize_index(self.index)  # (B,) uint8, the bytes of faiss.write_index
        manifest = {"format_version": FORMAT_VERSION, "ids": self.ids, "encoder": self.encoder,
                    "dim": self.dim, "kind": self.kind, "key": self.key,
                    "index_sha256": hashlib.sha256(blob).hexdigest()}
        return blob.tobytes(), json.dumps(manifest, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, index: bytes, manifest: bytes, encoder: str | None = None) -> "PoolIndex":
        """Validate and rebuild; `encoder`, when given, must be the encoder the pool was embedded with."""
        m = _parse_manifest(manifest)
        if hashlib.sha256(index).hexdigest() != m["index_sha256"]:
            raise PoolIndexError("index bytes do not match the manifest's index_sha256 "
                                 "(another pool's index, or corrupted)")
        if encoder is not None and m["encoder"] != encoder:
            raise PoolIndexError(f"pool was embedded with encoder={m['encoder']!r}, not {encoder!r}")
        try:
            faiss_index = faiss.deserialize_index(np.frombuffer(index, dtype=np.uint8))
        except RuntimeError as e:
            raise PoolIndexError(f"index bytes are unreadable: {e}") from e
        pool = cls(faiss_index, m["ids"], m["encoder"], m["key"])
        if (pool.dim, pool.kind) != (m["dim"], m["kind"]):
            raise PoolIndexError(f"index is {pool.kind} with dim {pool.dim}; "
                                 f"the manifest says {m['kind']} with dim {m['dim']}")
        return pool

    def save(self, directory: str | os.PathLike) -> Path:
        """Write index.faiss, then ids.json, each atomically (temp file + rename)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        index, manifest = self.to_bytes()
        atomic_write(d / INDEX_FILE, index)
        atomic_write(d / IDS_FILE, manifest)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder: str | None = None) -> "PoolIndex":
        d = Path(directory)
        for f in (IDS_FILE, INDEX_FILE):
            if not (d / f).is_file():
                raise PoolIndexError(f"no {f} in {d}: not a pool index (or an unfinished write)")
        try:
            return cls.from_bytes((d / INDEX_FILE).read_bytes(), (d / IDS_FILE).read_bytes(), encoder)
        except PoolIndexError as e:
            raise PoolIndexError(f"{d}: {e}") from e


def _kind_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    raise PoolIndexError(f"index type {type(index).__name__} is neither flat nor IVF-flat")


def _ivf(x: np.ndarray, nlist: int | None, nprobe: int | None) -> faiss.IndexIVFFlat:
    """An IVF-flat inner-product index trained on x (N, D); vectors not added yet."""
    n, d = x.shape
    nlist = nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist={nlist} must be in [1, {n}] for a pool of {n}")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # unit centroids: the right k-means for cosine
    index.train(x)
    nprobe = nprobe or max(1, nlist // 4)
    if not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe={nprobe} must be in [1, nlist={nlist}]")
    index.nprobe = nprobe
    return index


def _parse_manifest(raw: bytes) -> dict:
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PoolIndexError(f"{IDS_FILE} is not valid JSON: {e}") from e
    if not isinstance(m, dict):
        raise PoolIndexError(f"{IDS_FILE} is not a JSON object")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise PoolIndexError(f"{IDS_FILE} lacks fields {missing}")
    if m["format_version"] != FORMAT_VERSION:
        raise PoolIndexError(f"{IDS_FILE} format_version={m['format_version']!r}; this code reads {FORMAT_VERSION}")
    if not (isinstance(m["ids"], list) and all(isinstance(i, str) for i in m["ids"])):
        raise PoolIndexError(f"{IDS_FILE} ids must be a list of strings")
    return m


def _first_duplicate(items: Iterable[str]) -> str | None:
    seen = set()
    for i in items:
        if i in seen:
            return i
        seen.add(i)
    return None


def image_sha256(data: bytes) -> str:
    """The content digest of one image file's bytes, for `pool_key`."""
    return hashlib.sha256(data).hexdigest()


def pool_key(entries: Iterable[tuple[str, str]], encoder: str) -> str:
    """Content key of a pool embedded by `encoder`, from (id, image_sha256) pairs in any order.

    Same images under the same ids and the same encoder (name = weights) give
    the same key, so a saved index can be found and reused by it.
    """
    if not encoder:
        raise ValueError(f"encoder={encoder!r} must name the encoder and its weights")
    pairs = sorted((str(i), str(h)) for i, h in entries)
    dup = _first_duplicate(i for i, _ in pairs)
    if dup is not None:
        raise ValueError(f"pool id {dup!r} appears twice")
    body = json.dumps({"encoder": encoder, "pool": pairs}, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


# ---------------------------------------------------------------- mining


def mine_hard_negatives(index: PoolIndex, positives: np.ndarray, m: int, near_duplicate: float = 0.95,
                        exclude_ids: Iterable[str] = ()) -> list[tuple[str, float]]:
    """The m pool images most similar to a subject: (id, max cosine to any positive), best first.

    positives: (P, D) unit embeddings of the subject's photos. A pool image whose
    max cosine is >= near_duplicate is a near-duplicate of a photo and is left
    out, as is any id in exclude_ids. Ties break by id. With fewer than m
    eligible, all of them come back (and a warning is logged).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"m={m!r} must be an integer >= 0")
    if not 0 < near_duplicate <= 1:
        raise ValueError(f"near_duplicate={near_duplicate!r} must be in (0, 1]")
    q = check_embeddings(positives, "positives", index.dim)
    exclude = set(exclude_ids)
    if m == 0:
        return []
    best, eligible = _eligible_candidates(index, q, m, near_duplicate, exclude)
    ranked = sorted(((i, best[i]) for i in eligible), key=lambda t: (-t[1], t[0]))[:m]
    if len(ranked) < m:
        log.warning("asked for m=%d hard negatives, only %d pool images are eligible", m, len(ranked))
    return ranked


def _eligible_candidates(index: PoolIndex, q: np.ndarray, m: int, near_duplicate: float,
                         exclude: set[str]) -> tuple[dict[str, float], set[str]]:
    """Search with k doubling until every positive's top-k holds m eligible ids (or k = pool).

    Then the true top m are among the candidates: a pool image missing from the
    list of the positive it is closest to scores below m eligible images of that
    list. And every near-duplicate is seen, since each list reaches below the threshold.
    """
    k = min(index.size, m + len(exclude) + 16)
    while True:
        hits = index.search(q, k)  # per positive: [(id, cosine)], best first
        best: dict[str, float] = {}
        for i, s in (h for hs in hits for h in hs):
            best[i] = max(s, best.get(i, -math.inf))
        eligible = {i for i, s in best.items() if s < near_duplicate and i not in exclude}
        if k == index.size or all(sum(i in eligible for i, _ in hs) >= m for hs in hits):
            return best, eligible
        k = min(index.size, 2 * k)


def easy_negatives(pool_ids: Iterable[str], n: int, exclude: Iterable[str] = (), seed: int = 0) -> list[str]:
    """n distinct pool ids drawn at random (seeded), none in exclude; the order of pool_ids is irrelevant.

    Pass the subject's photos and its hard negatives as `exclude`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be an integer >= 0")
    candidates = sorted(set(pool_ids) - set(exclude))
    if len(candidates) < n:
        log.warning("asked for n=%d easy negatives, only %d pool images are eligible", n, len(candidates))
    return random.Random(seed).sample(candidates, min(n, len(candidates)))
