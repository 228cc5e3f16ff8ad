"""The negative pool at scale: embedded by a Ray Data pipeline, indexed once, reused by later jobs.

The index is stored under `indexes/<pool key>/` where the key is
`yollava.mining.pool_key` of (id, content sha256) pairs and the encoder's name
(which carries the backbone fingerprint): the same images embedded by the same
encoder are found again and not re-embedded. Pool ids are the images' sha256,
so renaming or moving files does not change the key.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from cluster.keys import index_prefix
from cluster.request import Photo
from cluster.store import ArtifactStore, ObjectNotFound
from yollava.mining import IDS_FILE, INDEX_FILE, PoolIndex, PoolIndexError, pool_key

log = logging.getLogger(__name__)


@dataclass
class PoolInfo:
    """What workers need to mine: the index location, ids, and the encoder name."""

    key: str
    encoder: str
    ids: list[str]


class _Embedder:
    """A Ray Data actor: loads the backbone once, embeds batches of encoded images."""

    def __init__(self, model_id: str):
        from yollava.backbone import load_backbone
        from yollava.mining import VisionTowerEncoder

        self.encoder = VisionTowerEncoder(load_backbone(model_id))

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch["image"]]
        return {"id": batch["id"], "embedding": self.encoder.embed(images)}  # (B,), (B, D)


def embed_pool(photos: list[Photo], model_id: str, batch_size: int = 32, concurrency: int = 1,
               num_cpus: float = 1, num_gpus: float = 0) -> tuple[list[str], np.ndarray]:
    """(ids, (N, D) unit embeddings) of the pool, through `map_batches` with an actor pool."""
    import ray

    ds = ray.data.from_items([{"id": p.sha256, "image": p.data} for p in photos])
    ds = ds.map_batches(_Embedder, fn_constructor_args=(model_id,), batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
                        num_gpus=num_gpus, batch_format="numpy")
    rows = ds.take_all()
    ids = [str(r["id"]) for r in rows]
    return ids, np.stack([np.asarray(r["embedding"], np.float32) for r in rows])


def embed_in_process(photos: list[Photo], encoder) -> tuple[list[str], np.ndarray]:
    """The same embedding without Ray (`--local` runs and benchmarks)."""
    from PIL import Image

    images = [Image.open(io.BytesIO(p.data)).convert("RGB") for p in photos]
    return [p.sha256 for p in photos], encoder.embed(images)


def ensure_index(store: ArtifactStore, photos: list[Photo], model_id: str, encoder_name: str,
                 encoder=None, **embed_options) -> tuple[PoolInfo, bool]:
    """The pool's index from the store, built (and stored) first if absent. Returns (info, built).

    Built by the Ray Data pipeline, or in this process with `encoder` when one is given.
    """
    key = pool_key(((p.sha256, p.sha256) for p in photos), encoder_name)
    folder = index_prefix(key)
    try:
        pool = load_index(store, key, encoder_name)
        log.info("negative pool %s: reusing the stored index (%d images)", key, pool.size)
        return PoolInfo(key, encoder_name, pool.ids), False
    except (ObjectNotFound, PoolIndexError) as e:
        log.info("negative pool %s: building the index (%s)", key, e)
    if encoder is not None:
        ids, emb = embed_in_process(photos, encoder)
    else:
        ids, emb = embed_pool(photos, model_id, **embed_options)
    pool = PoolIndex.build(emb, ids, encoder=encoder_name, key=key)
    index, manifest = pool.to_bytes()
    store.put_bytes(f"{folder}/{INDEX_FILE}", index)
    store.put_bytes(f"{folder}/{IDS_FILE}", manifest)  # last: an index without ids.json is not there
    return PoolInfo(key, encoder_name, pool.ids), True


def load_index(store: ArtifactStore, key: str, encoder_name: str) -> PoolIndex:
    folder = index_prefix(key)
    manifest = store.get_bytes(f"{folder}/{IDS_FILE}")
    pool = PoolIndex.from_bytes(store.get_bytes(f"{folder}/{INDEX_FILE}"), manifest, encoder_name)
    if pool.key != key:
        raise PoolIndexError(f"index stored under {key} says it is {pool.key}")
    return pool
