"""Galleries on Milvus, scaled out: two uvicorn replicas and a Celery worker share one
PostgreSQL (jobs, heads, reports, and the galleries' catalog and keys), one Redis and one Milvus
server (the galleries' vectors, metadata and pixels). A gallery created and filled through one
replica is the same gallery through the other, and a retrieval audit of it runs in the worker,
which reads it from Milvus. Nothing is mocked.
"""

import base64
import uuid

import httpx
import pytest

from tests.conftest import fresh_database
from tests.e2e.test_scale_out import finished
from tests.live import Stack


@pytest.fixture(scope="module")
def stack(model_dir, postgres, milvus, tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("scale-milvus"), model_dir, fresh_database(postgres),
              milvus_uri=milvus, milvus_prefix=f"e{uuid.uuid4().hex[:10]}_")
    try:
        s.start_redis()
        s.start_worker("worker")
        s.replicas = {name: s.start_api(name) for name in ("a", "b")}
        yield s
    finally:
        s.stop_all()


def test_a_gallery_filled_through_one_replica_is_searched_and_audited_through_the_other(
        stack, image_bytes):
    groups = list(image_bytes.values())
    images = [base64.b64encode(b).decode() for g in groups[:4] for b in g[:4]]
    keys = [f"img-{i:02d}" for i in range(len(images))][::-1]
    labels = [{"label": i // 4, "source": "cifar"} for i in range(len(images))]
    with httpx.Client(base_url=stack.replicas["a"], timeout=60) as a, \
            httpx.Client(base_url=stack.replicas["b"], timeout=60) as b:
        r = a.post("/indexes", json={"name": "pets"})
        assert r.status_code == 201, r.text
        assert r.json()["factory"] == "HNSW16"
        assert b.post("/indexes", json={"name": "pets"}).status_code == 409
        r = a.post("/indexes/pets/items", json={"keys": keys, "images": images,
                                                 "metadata": labels})
        assert r.status_code == 201, r.text
        dup = b.post("/indexes/pets/items", json={"keys": keys[:1], "images": images[:1]})
        assert dup.status_code == 409 and dup.json()["error"]["code"] == "duplicate_key"
        assert b.get("/indexes/pets").json()["count"] == len(keys)
        listed = b.get("/indexes/pets/items", params={"limit": 100}).json()
        assert [i["key"] for i in listed["items"]] == keys  # insertion order
        query = {"index": "pets", "images": images[:3], "k": 5, "consistency": "strong"}
        through_b = b.post("/search", json=query)
        assert through_b.status_code == 200, through_b.text
        assert through_b.json() == a.post("/search", json=query).json()
        assert [row[0]["key"] for row in through_b.json()["results"]] == keys[:3]
        filtered = b.post("/search", json={**query, "filter": {"label": {"in": [2, 3]}},
                                           "ef": 128}).json()
        assert all(h["metadata"]["label"] in (2, 3) for row in filtered["results"] for h in row)
        exported = b.get("/indexes/pets/export", params={"limit": 100}).json()
        assert [i["key"] for i in exported["items"]] == keys
        png = b.get(f"/indexes/pets/pixels/{keys[0]}")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        audit = b.post("/audits", json={"kind": "retrieval", "index": "pets", "k": 3,
                                        "steps": 2, "images": images[:2]})
        assert audit.status_code == 202, audit.text
        job = finished(a, audit.json()["job_id"])
        assert job["state"] == "succeeded", job["error"]
        report = a.get(audit.json()["result_url"]).json()
        assert report["gallery_size"] == len(keys) and report["num_queries"] == 2
        assert b.delete("/indexes/pets/items/" + keys[0]).json()["count"] == len(keys) - 1
        assert b.delete("/indexes/pets").status_code == 204
        assert a.get("/indexes/pets").status_code == 404
