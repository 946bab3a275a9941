"""Beyond one api process, the issue's scenario on the deployed configuration: two uvicorn
replicas and two Celery workers share one PostgreSQL (its own server, started here with initdb),
one Milvus server (the galleries' vectors, metadata and pixels), one Redis and one data
directory. Jobs, heads, reports, the registry of users' models and the galleries' catalog and
keys are the database's: a gallery filled through one replica is searched through the other, a
head fitted through one is used through the other, a user model uploaded on one is served by
the other, and a job outlives the replica that accepted it and the worker that ran it. Nothing
is mocked.
"""

import base64
import json
import os
import uuid

import httpx
import pytest

from byorl.service.settings import Settings
from byorl.service.storage.database import Database
from byorl.service.storage.job_store import JobStore
from tests.conftest import flatten_onnx, fresh_database
from tests.live import Stack, wait_for

SWEEP_S = "2"  # replicas sweep for lost jobs every 2 s (default 15) to keep the test short
REFRESH_S = "1"  # replicas follow the model registry every second (default 5)


@pytest.fixture(scope="module")
def stack(model_dir, postgres, milvus, tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("scale"), model_dir, fresh_database(postgres),
              job_sweep_s=SWEEP_S, model_refresh_s=REFRESH_S, milvus_uri=milvus,
              milvus_prefix=f"e{uuid.uuid4().hex[:10]}_")
    try:
        s.start_redis()
        s.start_worker("worker1")
        s.start_worker("worker2")
        s.replicas = {name: s.start_api(name) for name in ("a", "b")}
        yield s
    finally:
        s.stop_all()


@pytest.fixture(scope="module")
def labeled(image_bytes):
    groups = list(image_bytes.values())
    images = [base64.b64encode(b).decode() for b in groups[3][:8] + groups[8][:8]]
    return images, [0] * 8 + [1] * 8


def client(stack, name: str) -> httpx.Client:
    return httpx.Client(base_url=stack.replicas[name], timeout=30)


def finished(c: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    return wait_for(lambda: (j := c.get(f"/jobs/{job_id}").json())["state"] in (
        "succeeded", "failed") and j, timeout, f"job {job_id}")


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


def test_a_head_fitted_through_one_replica_is_used_through_the_other(stack, labeled):
    images, labels = labeled
    with client(stack, "b") as b, client(stack, "a") as a:
        r = b.post("/linear-head", json={"classes": ["cat", "ship"], "labels": labels,
                                         "images": images, "epochs": 3, "min_steps": 20})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert a.get(f"/jobs/{job_id}").json()["id"] == job_id  # seen at once on A
        job = finished(a, job_id)
        assert job["state"] == "succeeded", job["error"]
        assert a.get(f"/heads/{job_id}").json()["id"] == job_id
        assert job_id in [h["id"] for h in a.get("/heads").json()["items"]]
        pred_a = a.post(f"/heads/{job_id}/predict", json={"images": images[:4]}).json()
        pred_b = b.post(f"/heads/{job_id}/predict", json={"images": images[:4]}).json()
        assert pred_a == pred_b and len(pred_a["labels"]) == 4
        audit = a.post("/audits", json={"kind": "robustness", "head_id": job_id,
                                        "images": images[:2], "labels": labels[:2],
                                        "mode": "quick"})
        assert audit.status_code == 202, audit.text
        assert finished(b, audit.json()["job_id"])["state"] == "succeeded"
        assert b.get(audit.json()["result_url"]).json()["n"] == 2  # the report, through B
        assert b.delete(f"/heads/{job_id}").status_code == 204
        assert a.get(f"/heads/{job_id}").status_code == 404  # deleted through B, gone on A


def test_a_user_model_uploaded_on_one_replica_is_served_by_the_other(stack, labeled):
    """The model registry (PostgreSQL) and the shared data directory: B serves what A
    registered, a worker fits a head on it (found through the registry), A's delete reaches B."""
    images, labels = labeled
    card = json.dumps({"name": "shared", "input_size": 8})
    with client(stack, "a") as a, client(stack, "b") as b:
        r = a.post("/models", data={"card": card}, timeout=120,
                   files={"file": ("m.onnx", flatten_onnx(), "application/octet-stream")})
        assert r.status_code == 201, r.text
        model_id = r.json()["model_id"]
        on_a = a.post("/embed", json={"images": images[:2], "model": model_id}).json()
        on_b = b.post("/embed", json={"images": images[:2], "model": model_id}).json()
        assert on_b["model_id"] == model_id and on_b["embeddings"] == on_a["embeddings"]
        r = b.post("/linear-head", json={"classes": ["cat", "ship"], "labels": labels,
                                         "images": images, "model": model_id, "epochs": 2,
                                         "min_steps": 5})
        assert r.status_code == 202, r.text
        job = finished(a, r.json()["job_id"])
        assert job["state"] == "succeeded", job["error"]
        assert a.delete(f"/models/{model_id}").json()["error"]["code"] == "model_in_use"
        assert b.delete(f"/heads/{job['id']}").status_code == 204
        assert a.delete(f"/models/{model_id}").status_code == 204
        wait_for(lambda: b.post("/embed", json={"images": images[:1], "model": model_id}
                                ).status_code == 404, 5 * float(REFRESH_S) + 10,
                 "B to refuse the deleted model")


def records(stack) -> JobStore:
    """The job records as every replica and worker sees them."""
    url = Settings(database_url=stack.env["BYORL_DATABASE_URL"]).database()
    return JobStore(Database(url), stack.env["BYORL_DATA_DIR"])


def worker_of(stack, runner_pid: int) -> str:
    """The worker (process group) whose pool process runs a job."""
    group = os.getpgid(runner_pid)
    return next(name for name, p in stack.procs.items() if p.pid == group)


def test_a_job_outlives_the_replica_that_accepted_it_and_the_worker_that_ran_it(stack, labeled):
    images, labels = labeled
    with client(stack, "a") as a:
        r = a.post("/linear-head", json={"classes": ["cat", "ship"], "labels": labels,
                                         "images": images, "robust": True, "epochs": 30,
                                         "attack_steps": 2, "min_steps": 200,
                                         "validation_fraction": 0})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        wait_for(lambda: a.get(f"/jobs/{job_id}").json()["progress"] > 0, 300,
                 "the job to make progress")
    stack.kill("a")  # the replica that accepted it
    runner = records(stack).get(job_id)["runner"]  # (the record's lease, not in the API)
    lost = worker_of(stack, runner["pid"])
    stack.kill(lost)  # the worker running it: main process and pool process at once
    survivor = ({"worker1", "worker2"} - {lost}).pop()
    with client(stack, "b") as b:  # B's sweep queues it again, the other worker runs it
        job = finished(b, job_id, timeout=600)
        assert job["state"] == "succeeded" and job["attempts"] == 2, job  # once more, not twice
        assert b.get(f"/heads/{job_id}").status_code == 200
    assert " succeeded in " in stack.log(survivor)
