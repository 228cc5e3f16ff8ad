"""The upload API through HTTP (issue 17): bad uploads, quotas, two tenants, a restart mid-queue.

One app (tiny model, file store) on a local Ray whose job API is up. It starts with a
queue that never submits (a batch needs 100 subjects), so uploads stay queued while
the refusals and quotas are checked; then the service is redeployed with a queue that
submits, and killed while the job trains: the job that trained every tenant's
subjects together is followed to the end by the restarted service, and nothing is
trained twice.
"""

import base64
import io
import time

import pytest
from openai import OpenAI
from PIL import Image

from cluster.store import open_store
from tests.conftest import random_photo
from tests.serve.conftest import save_concept
from tests.serve.upload_helpers import ray_jobs, upload_app, wait_for

pytestmark = pytest.mark.slow

QUIET = {"min_batch": 100, "max_wait_s": 3600}  # nothing is submitted
RECIPE = {"num_latent": 2, "epochs": 1, "hard_negatives": 0, "easy_negatives": 0, "positive_questions": 1,
          "attribute_questions": 1, "max_answer_tokens": 4, "flip": False, "batch_size": 4}
LIMITS = {"min_photos": 3, "max_photos": 5, "max_concepts": 3, "max_queued": 2, "max_body_bytes": 1_000_000}


def png(seed=0, size=40) -> bytes:
    buf = io.BytesIO()
    random_photo(seed, size).save(buf, format="PNG")
    return buf.getvalue()


def files(*blobs):
    return [("photos", (f"p{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def data_url(blob: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(blob).decode()


@pytest.fixture(scope="module")
def app(tiny, tmp_path_factory):
    with upload_app(tmp_path_factory.mktemp("uploads"), ("alice", "bob", "carol"), "tiny",
                    {**QUIET, "recipe": RECIPE, "max_active_jobs": 1},
                    limits={"max_image_bytes": 400_000, "max_image_pixels": 512 * 512},
                    upload_limits=LIMITS) as a:
        store = open_store(a.store_uri)
        for name in ("x1", "x2", "x3"):  # carol owns three concepts: her quota
            save_concept(store, tiny, "carol", name, seed=7)
        yield a


def error(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if code:
        assert body["code"] == code, body
    return body


def test_bad_uploads_are_refused_naming_the_value_and_store_nothing(app):
    good = [png(i) for i in range(3)]
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, format="PNG")  # 36 Mpx in a few KB: refused from its header
    with app.client() as c:
        assert error(c.post("/v1/concepts", files=files(*good), data={"name": "ok"}), 401)["code"] == "invalid_api_key"
    with app.client("alice") as c:
        e = error(c.post("/v1/concepts", files=files(*good), data={"name": "../x"}), 400, "invalid_name")
        assert "'../x'" in e["message"] and e["param"] == "name"
        error(c.post("/v1/concepts", files=files(*good), data={"name": "Bo"}), 400, "invalid_name")
        e = error(c.post("/v1/concepts", files=files(*good[:2]), data={"name": "bo"}), 400, "too_few_photos")
        assert "2 distinct" in e["message"]
        e = error(c.post("/v1/concepts", files=files(good[0], good[0], good[0]), data={"name": "bo"}), 400,
                  "too_few_photos")
        assert "duplicate" in e["message"]
        e = error(c.post("/v1/concepts", files=files(good[0], good[1][:80], good[2]), data={"name": "bo"}), 400,
                  "invalid_image")
        assert e["param"] == "photos[1]" and "'p1.png'" in e["message"]
        e = error(c.post("/v1/concepts", files=files(good[0], good[1], bomb.getvalue()), data={"name": "bo"}), 400,
                  "invalid_image")
        assert "6000x6000" in e["message"] and e["param"] == "photos[2]"
        e = error(c.post("/v1/concepts", files=files(good[0], good[1], b"GIF89a not really"), data={"name": "bo"}),
                  400, "invalid_image")
        assert "photos[2]" in e["message"]
        error(c.post("/v1/concepts", files=files(*good), data={"name": "bo", "owner": "bob"}), 400)
        error(c.post("/v1/concepts", content=b"name=bo", headers={"content-type": "text/plain"}), 415,
              "unsupported_media_type")
        e = error(c.post("/v1/concepts", json={"name": "bo", "photos": [data_url(good[0]), "https://x/y.png",
                                                                         data_url(good[2])]}), 400, "invalid_image")
        assert "not fetched" in e["message"] and e["param"] == "photos[1]"
        error(c.post("/v1/concepts", json={"name": "bo", "photos": [data_url(b) for b in good], "x": 1}), 400)
        error(c.post("/v1/concepts", json={"name": "bo", "photos": ["data:image/png;base64,@@@"] * 3}), 400,
              "invalid_image")
        big = b"x" * 1_500_000
        error(c.post("/v1/concepts", content=big, headers={"content-type": "application/json"}), 413,
              "request_too_large")

        def chunked():  # no content-length: the cap holds while the form streams in
            yield b'--b\r\nContent-Disposition: form-data; name="photos"; filename="a.png"\r\n\r\n'
            for _ in range(15):
                yield b"x" * 100_000

        error(c.post("/v1/concepts", content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"}),
              413, "request_too_large")
    assert open_store(app.store_uri).list_prefix("uploads") == []
    assert open_store(app.store_uri).list_prefix("queue") == []


def test_uploads_quotas_and_two_tenants(app):
    photos = [png(10 + i) for i in range(4)]
    with app.client("alice") as c:
        error(c.post("/v1/concepts", files=files(*[png(30 + i) for i in range(6)]), data={"name": "c1"}), 403,
              "photo_quota_exceeded")
        r = c.post("/v1/concepts", files=files(*photos), data={"name": "c1", "description": "my cube"})
        assert r.status_code == 202, r.text
        body = r.json()
        assert (body["name"], body["status"], body["version"], body["owner"]) == ("c1", "queued", None, "alice")
        e = error(c.post("/v1/concepts", files=files(*photos), data={"name": "c1"}), 409, "concept_busy")
        assert "'c1'" in e["message"]
        # JSON with data URLs, the other form of the same request
        r = c.post("/v1/concepts", json={"name": "c2", "photos": [data_url(png(20 + i)) for i in range(3)]})
        assert r.status_code == 202, r.text
        r = c.post("/v1/concepts", files=files(*photos), data={"name": "c3"})
        e = error(r, 429, "queue_quota_exceeded")
        assert int(r.headers["retry-after"]) >= 1 and "alice" in e["message"]
        listed = {d["name"]: d["status"] for d in c.get("/v1/concepts").json()["data"]}
        assert listed == {"c1": "queued", "c2": "queued"}
    with app.client("bob") as c:  # alice's concepts are not bob's: not listed, not readable, not deletable
        assert c.get("/v1/concepts").json()["data"] == []
        error(c.get("/v1/concepts/c1"), 404, "concept_not_found")
        error(c.delete("/v1/concepts/c1"), 404, "concept_not_found")
    # bob's own c1, through the official client as the README shows (JSON with data URLs)
    client = OpenAI(base_url=f"{app.url}/v1", api_key=app.keys["bob"], max_retries=0)
    body = client.post("/concepts", cast_to=object,
                       body={"name": "c1", "description": "a cup", "photos": [data_url(png(40 + i)) for i in range(3)]})
    assert (body["owner"], body["name"], body["status"]) == ("bob", "c1", "queued")
    assert client.get("/concepts/c1", cast_to=object)["upload"]["id"] == body["upload"]["id"]
    with app.client("carol") as c:
        error(c.post("/v1/concepts", files=files(*photos[:3]), data={"name": "x4"}), 403, "concept_quota_exceeded")
        r = c.post("/v1/concepts", files=files(*[png(50 + i) for i in range(3)]), data={"name": "x1"})
        assert r.status_code == 202, r.text  # a new version of a concept she owns
        body = r.json()
        assert (body["status"], body["version"]) == ("queued", 1)  # v1 answers meanwhile
    with app.client("alice") as c:
        assert c.get("/v1/concepts/c1").json()["status"] == "queued"
    store = open_store(app.store_uri)
    assert sorted({k.split("/")[1] for k in store.list_prefix("uploads")}) == ["alice", "bob", "carol"]
    assert all(k.split("/")[2] in ("c1", "c2", "x1") for k in store.list_prefix("uploads"))


def test_a_queued_concept_can_be_deleted_and_its_photos_go(app):
    with app.client("bob") as c:
        r = c.post("/v1/concepts", files=files(*[png(60 + i) for i in range(3)]), data={"name": "gone"})
        assert r.status_code == 202
        assert c.delete("/v1/concepts/gone").status_code == 200
        error(c.get("/v1/concepts/gone"), 404)
    store = open_store(app.store_uri)
    assert store.list_prefix("uploads/bob/gone") == []
    assert len(store.list_prefix("queue/pending")) == 4  # alice c1, c2; bob c1; carol x1


def test_a_restart_mid_queue_trains_every_tenant_once_in_one_job(app):
    store = open_store(app.store_uri)
    waiting = sorted(k for k in store.list_prefix("queue/pending"))
    assert len(waiting) == 4 and ray_jobs(app) == []
    # The service restarts with a queue that submits: the four uploads waited in the store, not in memory.
    app.deploy(uploads={**app.args["uploads"], "queue": {**app.args["uploads"]["queue"], "min_batch": 4,
                                                          "max_wait_s": 1}})

    def training(tenant, name):
        with app.client(tenant) as c:
            body = c.get(f"/v1/concepts/{name}").json()
        return body if body["status"] == "training" and body["progress"] >= 0.1 else None

    wait_for(lambda: training("alice", "c1"), 180, "alice's c1 to train")
    with app.client("carol") as c:  # the old version answers while the new one trains
        body = c.get("/v1/concepts/x1").json()
        assert body["status"] == "training" and body["version"] == 1
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "Who is <x1>?"}]})
        assert r.status_code == 200 and r.headers["x-concepts-used"] == "<x1>"
    app.stop_service()  # the service dies while its job trains; the job goes on in Ray
    time.sleep(2)
    app.deploy()

    def ready(tenant, name):
        with app.client(tenant) as c:
            body = c.get(f"/v1/concepts/{name}").json()
        assert body["status"] in ("queued", "training", "ready"), body
        return body if body["status"] == "ready" else None

    final = {(t, n): wait_for(lambda t=t, n=n: ready(t, n), 300, f"{t}/{n} to be ready")
             for t, n in (("alice", "c1"), ("alice", "c2"), ("bob", "c1"), ("carol", "x1"))}
    jobs = ray_jobs(app)
    assert len(jobs) == 1 and jobs[0].submission_id.endswith("-a1"), [j.submission_id for j in jobs]
    summary = store.get_json(f"jobs/{jobs[0].submission_id}/summary.json")
    assert sorted((r["owner"], r["name"], r["status"]) for r in summary["subjects"]) == [
        ("alice", "c1", "trained"), ("alice", "c2", "trained"), ("bob", "c1", "trained"), ("carol", "x1", "trained")]
    assert {k: b["version"] for k, b in final.items()} == {("alice", "c1"): 1, ("alice", "c2"): 1, ("bob", "c1"): 1,
                                                          ("carol", "x1"): 2}
    assert store.versions("alice", "c1") == [1] and store.versions("carol", "x1") == [1, 2]
    assert store.list_prefix("queue/pending") == []
    assert not any("/photos/" in k for k in store.list_prefix("uploads"))  # trained: the photos went
    with app.client("alice") as c:
        body = c.get("/v1/concepts/c1").json()
        assert body["upload"]["job_id"] == jobs[0].submission_id and isinstance(body["metrics"].get("loss"), float)
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "Is <c1> here?"}]})
        assert r.headers["x-concepts-used"] == "<c1>"
        assert c.delete("/v1/concepts/c2").status_code == 200
    assert store.list_prefix("uploads/alice/c2") == [] and store.versions("alice", "c2") == []
    with app.client("bob") as c:
        assert [d["name"] for d in c.get("/v1/concepts").json()["data"]] == ["c1"]


def test_upload_config_is_checked_when_the_app_is_built():
    from pydantic import ValidationError

    from serve.app import AppArgs

    for bad, field in (({"queue": {"min_batch": 0}}, "min_batch"), ({"queue": {"recipe": {"epochz": 1}}}, "epochz"),
                       ({"limits": {"min_photos": 0}}, "min_photos"), ({"queue": {"nope": 1}}, "nope")):
        with pytest.raises(ValidationError, match=field):
            AppArgs(store="file:///tmp/x", keys="k.json", uploads=bad)
    assert AppArgs(store="file:///tmp/x", keys="k.json").uploads is None  # uploads are asked for, never implied


def test_stored_photos_carry_no_metadata():
    """A photo's colour profile, EXIF and text chunks are not stored (ADR 002: PNG, no metadata)."""
    from PIL import PngImagePlugin

    from serve.images import ImageLimits
    from serve.uploads import RawUpload, UploadLimits, prepare_photos

    src = random_photo(7)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "taken at home, 12 Main St")
    buf = io.BytesIO()
    src.save(buf, format="PNG", icc_profile=b"not-a-real-profile" * 8, pnginfo=info)
    assert b"iCCP" in buf.getvalue() and b"Main St" in buf.getvalue()
    raw = RawUpload("bo", None, [(f"photos[{i}]", buf.getvalue() if i == 0 else _png(random_photo(i)))
                                 for i in range(3)])
    stored = prepare_photos(raw, UploadLimits(), ImageLimits(max_bytes=10_000_000, max_pixels=10_000_000))
    png = stored[0][0]
    assert b"iCCP" not in png and b"Main St" not in png and b"tEXt" not in png
    assert Image.open(io.BytesIO(png)).size == src.size


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
