import json
import logging

import numpy as np
import open_clip
import pytest
import torch

from tests.conftest import random_photo
from yollava.mining import (
    IDS_FILE,
    INDEX_FILE,
    OpenClipEncoder,
    PoolIndex,
    PoolIndexError,
    VisionTowerEncoder,
    easy_negatives,
    image_sha256,
    mine_hard_negatives,
    pool_key,
)

SMALL_CLIP = "ViT-S-32"  # random init + 5 photos: well under a second on CPU


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def at_cosine(axis, cos, d=6):
    """A unit vector with cosine `cos` to basis vector `axis` and 0 to every other axis < d-1."""
    v = np.zeros(d, np.float32)
    v[axis], v[-1] = cos, np.sqrt(1 - cos**2)
    return v


def clustered(n_clusters=8, per=50, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_clusters, d)))
    x = unit(np.repeat(centres, per, axis=0) + 0.15 * rng.normal(size=(n_clusters * per, d)))
    return x, [f"img{i:04d}" for i in range(len(x))]


def brute_force(pool, ids, positives, m, near_duplicate, exclude=()):
    best = (pool @ positives.T).max(axis=1)  # (N,)
    keep = [(i, float(s)) for i, s in zip(ids, best) if s < near_duplicate and i not in exclude]
    return sorted(keep, key=lambda t: (-t[1], t[0]))[:m]


@pytest.fixture(scope="module")
def photos():
    return [random_photo(seed=i, size=40 + 8 * i) for i in range(5)]


# ---------------------------------------------------------------- encoders


def check_rows(e, n, d):
    assert e.shape == (n, d) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_open_clip_encoder_is_deterministic_and_batch_invariant(photos):
    rng_state = torch.get_rng_state()
    a = OpenClipEncoder(SMALL_CLIP, batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the seeded init leaves the caller's RNG alone
    b = OpenClipEncoder(SMALL_CLIP, batch_size=len(photos))
    ea, eb = a.embed(photos), b.embed(photos)
    check_rows(ea, len(photos), a.dim)
    np.testing.assert_allclose(ea, eb, atol=1e-5)
    assert a.name == b.name and a.name.startswith(f"open_clip:{SMALL_CLIP}:")
    assert OpenClipEncoder(SMALL_CLIP, seed=1).name != a.name
    assert a.embed([]).shape == (0, a.dim)


def test_open_clip_encoder_loads_a_local_weights_file(tmp_path, photos):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(SMALL_CLIP)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    from_file = OpenClipEncoder(SMALL_CLIP, pretrained=str(path), seed=123)
    seeded = OpenClipEncoder(SMALL_CLIP, seed=0)
    assert from_file.name == seeded.name
    np.testing.assert_allclose(from_file.embed(photos[:2]), seeded.embed(photos[:2]), atol=1e-6)


@pytest.mark.parametrize("kwargs, bad", [
    ({"model_name": SMALL_CLIP, "pretrained": "laion2b_s34b_b79k"}, "laion2b_s34b_b79k"),
    ({"model_name": "hf-hub:someone/some-clip"}, "hf-hub:someone/some-clip"),
    ({"model_name": "roberta-ViT-B-32"}, "roberta-ViT-B-32"),
    ({"model_name": SMALL_CLIP, "batch_size": 0}, "batch_size=0"),
])
def test_open_clip_encoder_refuses_anything_that_would_download(monkeypatch, kwargs, bad):
    def no_download(*args, **kw):
        raise AssertionError(f"open_clip was asked to fetch {args}")

    for fn in ("download_pretrained", "download_pretrained_from_hf", "_get_hf_config"):
        monkeypatch.setattr(open_clip.factory, fn, no_download)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_download)
    with pytest.raises(ValueError, match=bad):
        OpenClipEncoder(**kwargs)


def test_vision_tower_encoder(tiny, photos):
    enc = VisionTowerEncoder(tiny, batch_size=2)
    e = enc.embed(photos)
    check_rows(e, len(photos), tiny.config.vision_config.hidden_size)
    np.testing.assert_allclose(e, VisionTowerEncoder(tiny, batch_size=5).embed(photos), atol=1e-5)
    mean = VisionTowerEncoder(tiny, pooling="mean")
    check_rows(mean.embed(photos), len(photos), enc.dim)
    assert enc.name.endswith(":pooled") and tiny.fingerprint in enc.name and mean.name != enc.name
    with pytest.raises(ValueError, match="'max'"):
        VisionTowerEncoder(tiny, pooling="max")


# ---------------------------------------------------------------- the index


def test_ivf_with_every_list_probed_matches_flat():
    x, ids = clustered()
    queries = x[::37] + 0.05
    flat = PoolIndex.build(x, ids, kind="flat")
    ivf = PoolIndex.build(x, ids, kind="ivf", nlist=8, nprobe=8)
    assert (flat.kind, ivf.kind) == ("flat", "ivf")
    for f, i in zip(flat.search(unit(queries), 10), ivf.search(unit(queries), 10)):
        assert [h[0] for h in f] == [h[0] for h in i]
        np.testing.assert_allclose([h[1] for h in f], [h[1] for h in i], atol=1e-5)


def test_auto_kind_switches_to_ivf_past_the_threshold():
    x, ids = clustered()
    assert PoolIndex.build(x, ids, ivf_threshold=len(x)).kind == "flat"
    big = PoolIndex.build(x, ids, ivf_threshold=len(x) - 1)
    assert big.kind == "ivf" and 1 <= big.index.nprobe <= big.index.nlist <= len(x) // 39


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip_gives_identical_search(tmp_path, kind):
    x, ids = clustered()
    pool = PoolIndex.build(x, ids, encoder="enc:v1", key="sha256:abc", kind=kind, nlist=8, nprobe=3)
    q = unit(x[:5] + 0.1)
    loaded = PoolIndex.load(pool.save(tmp_path), encoder="enc:v1")
    assert (loaded.ids, loaded.encoder, loaded.key, loaded.kind) == (ids, "enc:v1", "sha256:abc", kind)
    assert loaded.search(q, 20) == pool.search(q, 20)
    assert PoolIndex.from_bytes(*pool.to_bytes()).search(q, 20) == pool.search(q, 20)


def edit_manifest(d, change):
    m = json.loads((d / IDS_FILE).read_text())
    change(m)
    (d / IDS_FILE).write_text(json.dumps(m))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["ids"].pop(), "399 ids for an index of 400"),
    (lambda m: m.update(dim=32), "dim 16; the manifest says flat with dim 32"),
    (lambda m: m.update(kind="ivf"), "manifest says ivf"),
    (lambda m: m["ids"].__setitem__(1, m["ids"][0]), "duplicate ids, e.g. 'img0000'"),
    (lambda m: m.update(index_sha256="0" * 64), "index_sha256"),
    (lambda m: m.pop("encoder"), r"lacks fields \['encoder'\]"),
    (lambda m: m.update(format_version=9), "format_version=9"),
])
def test_load_refuses_a_mismatched_manifest(tmp_path, change, message):
    x, ids = clustered()
    d = PoolIndex.build(x, ids, encoder="enc:v1").save(tmp_path)
    edit_manifest(d, change)
    with pytest.raises(PoolIndexError, match=message):
        PoolIndex.load(d)


def test_load_refuses_another_pools_index_corrupt_json_and_the_wrong_encoder(tmp_path):
    x, ids = clustered()
    a = PoolIndex.build(x, ids, encoder="enc:v1").save(tmp_path / "a")
    b = PoolIndex.build(x[::-1].copy(), ids, encoder="enc:v1").save(tmp_path / "b")
    (a / INDEX_FILE).write_bytes((b / INDEX_FILE).read_bytes())
    with pytest.raises(PoolIndexError, match="another pool's index"):
        PoolIndex.load(a)
    with pytest.raises(PoolIndexError, match="encoder='enc:v1', not 'enc:v2'"):
        PoolIndex.load(b, encoder="enc:v2")
    (b / IDS_FILE).write_text("{not json")
    with pytest.raises(PoolIndexError, match="not valid JSON"):
        PoolIndex.load(b)
    with pytest.raises(PoolIndexError, match="no ids.json"):
        PoolIndex.load(tmp_path / "missing")


@pytest.mark.parametrize("embeddings, ids, message", [
    (np.ones((2, 4)), ["a", "b"], "row 0 has norm 2.0000"),
    (unit(np.ones((2, 4))), ["a"], "1 ids for 2 embeddings"),
    (unit(np.ones((2, 4))), ["a", "a"], "duplicate ids, e.g. 'a'"),
    (np.zeros((0, 4)), [], r"shape \(0, 4\)"),
])
def test_build_refuses_bad_input(embeddings, ids, message):
    with pytest.raises(ValueError, match=message):
        PoolIndex.build(embeddings, ids)


def test_pool_key_is_order_free_and_changes_with_content_or_encoder():
    pool = [("a", image_sha256(b"A")), ("b", image_sha256(b"B"))]
    key = pool_key(pool, "enc:v1")
    assert key == pool_key(pool[::-1], "enc:v1")
    assert key != pool_key(pool, "enc:v2")
    assert key != pool_key([("a", image_sha256(b"A")), ("b", image_sha256(b"C"))], "enc:v1")
    with pytest.raises(ValueError, match="'a' appears twice"):
        pool_key(pool + [("a", image_sha256(b"D"))], "enc:v1")


# ---------------------------------------------------------------- mining


@pytest.fixture
def hand_built():
    """Positives: axes 0 and 1. Pool ids name the max cosine to them."""
    positives = np.stack([at_cosine(0, 1.0), at_cosine(1, 1.0)])
    pool = {
        "copy": at_cosine(0, 1.0),   # a positive, copied into the pool
        "dup": at_cosine(1, 0.97),   # a near-duplicate
        "own": at_cosine(0, 0.93),   # the subject's own photo, under another name
        "a90": at_cosine(0, 0.90),
        "b80": at_cosine(1, 0.80),
        "c70": at_cosine(0, 0.70),
        "z60": at_cosine(1, 0.60),
        "y60": at_cosine(1, 0.60),   # tie with z60: ids decide
        "far": at_cosine(2, 1.0),    # cosine 0 to both
    }
    return PoolIndex.build(np.stack(list(pool.values())), list(pool)), positives


def test_mining_returns_the_nearest_non_duplicates_in_order(hand_built):
    index, positives = hand_built
    got = mine_hard_negatives(index, positives, m=4, exclude_ids={"own"})
    assert [i for i, _ in got] == ["a90", "b80", "c70", "y60"]
    np.testing.assert_allclose([s for _, s in got], [0.9, 0.8, 0.7, 0.6], atol=1e-6)
    assert mine_hard_negatives(index, positives, m=1)[0][0] == "own"  # not excluded unless asked
    assert mine_hard_negatives(index, positives, m=0) == []


def test_mining_more_than_the_pool_returns_every_eligible(hand_built, caplog):
    index, positives = hand_built
    with caplog.at_level(logging.WARNING, logger="yollava.mining"):
        got = mine_hard_negatives(index, positives, m=50, exclude_ids={"own"})
    assert [i for i, _ in got] == ["a90", "b80", "c70", "y60", "z60", "far"]
    assert "m=50" in caplog.text


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_mining_matches_brute_force_past_many_near_duplicates(kind):
    # 300 near-copies of the positives push the eligible images past the first k searched.
    rng = np.random.default_rng(0)
    positives = unit(rng.normal(size=(3, 16)))
    dups = unit(np.repeat(positives, 100, axis=0) + 0.01 * rng.normal(size=(300, 16)))
    x = np.concatenate([dups, clustered()[0]])
    ids = [f"p{i:04d}" for i in range(len(x))]
    index = PoolIndex.build(x, ids, kind=kind, nlist=8, nprobe=8)
    exclude = {"p0350", "p0351"}
    want = brute_force(x, ids, positives, 20, 0.9, exclude)
    got = mine_hard_negatives(index, positives, m=20, near_duplicate=0.9, exclude_ids=exclude)
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"m": -1}, "m=-1"),
    ({"m": 2.5}, "m=2.5"),
    ({"m": 1, "near_duplicate": 0.0}, "near_duplicate=0.0"),
    ({"m": 1, "near_duplicate": 1.5}, "near_duplicate=1.5"),
    ({"m": 1, "positives": unit(np.ones((1, 4)))}, "positives has dim 4; the index has dim 6"),
    ({"m": 1, "positives": np.ones((1, 6))}, "positives row 0 has norm"),
])
def test_mining_refuses_bad_arguments(hand_built, kwargs, message):
    index, positives = hand_built
    kwargs = {"positives": positives, **kwargs}
    with pytest.raises(ValueError, match=message):
        mine_hard_negatives(index, **kwargs)


def test_easy_negatives_are_seeded_distinct_and_exclude():
    ids = [f"img{i}" for i in range(20)]
    got = easy_negatives(ids, 5, exclude={"img0", "img1"}, seed=3)
    assert got == easy_negatives(ids[::-1], 5, exclude={"img0", "img1"}, seed=3)
    assert len(set(got)) == 5 and not {"img0", "img1"} & set(got)
    assert got != easy_negatives(ids, 5, exclude={"img0", "img1"}, seed=4)
    assert sorted(easy_negatives(ids, 30, exclude=ids[2:])) == ["img0", "img1"]
    with pytest.raises(ValueError, match="n=-1"):
        easy_negatives(ids, -1)
