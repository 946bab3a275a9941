"""The service as deployed, natively: a real redis-server on its own port, Celery worker
processes and a uvicorn server, talking over HTTP and Redis; the compose topology without Docker.
Default settings throughout (job time limit, leases, sweeps).
"""

import base64
import json
import random
import signal
import threading
import time

import httpx
import pytest
import redis

from tests.live import Stack, wait_for

RERUN_BOUND_S = 300  # a job whose worker vanished runs again on a live worker within 5 minutes


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("e2e"), model_dir)
    try:
        s.start_redis()
        s.start_worker("worker1")
        s.start_api()
        yield s
    finally:
        s.stop_all()


@pytest.fixture(scope="module")
def api(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def data(image_bytes):
    """Two classes of images, base64, and their labels."""
    cats, ships = image_bytes["cat"] if "cat" in image_bytes else list(image_bytes.values())[3], \
        image_bytes["ship"] if "ship" in image_bytes else list(image_bytes.values())[8]
    images = [base64.b64encode(b).decode() for b in cats + ships]
    return images, [0] * len(cats) + [1] * len(ships)


def wait_job(api, job_id: str, timeout: float = 120) -> dict:
    def done():
        job = api.get(f"/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed") else None

    return wait_for(done, timeout, f"job {job_id}")


def test_embed_add_search(api, data):
    images, _ = data
    emb = api.post("/embed", json={"images": images[:2]}).json()
    assert emb["dim"] == 256 and len(emb["embeddings"]) == 2
    assert api.post("/indexes", json={"name": "pets"}).status_code == 201
    keys = [f"img-{i}" for i in range(len(images))]
    r = api.post("/indexes/pets/items", json={"keys": keys, "images": images,
                                              "metadata": [{"i": i} for i in range(len(keys))]})
    assert r.status_code == 201 and r.json()["count"] == len(keys)
    hits = api.post("/search", json={"index": "pets", "images": [images[5]], "k": 3}).json()
    assert hits["results"][0][0]["key"] == "img-5"
    assert hits["results"][0][0]["metadata"] == {"i": 5}


def test_fit_head_from_index_keys_then_predict(api, data):
    images, labels = data
    keys = [f"img-{i}" for i in range(len(images))]
    r = api.post("/linear-head", json={"classes": ["cat", "ship"], "labels": labels,
                                       "index": "pets", "keys": keys, "epochs": 5,
                                       "min_steps": 50})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert r.headers["Location"] == accepted["status_url"] == f"/jobs/{accepted['job_id']}"
    job = wait_job(api, r.json()["job_id"])
    assert job["state"] == "succeeded", job["error"]
    head_id = job["result"]["head_id"]
    assert accepted["result_url"] == f"/heads/{head_id}" == f"/heads/{accepted['job_id']}"
    assert api.get(accepted["result_url"]).json()["id"] == head_id
    assert head_id in [h["id"] for h in api.get("/heads").json()["items"]]
    pred = api.post(f"/heads/{head_id}/predict", json={"images": images[:4]}).json()
    assert len(pred["labels"]) == 4 and set(pred["classes"]) <= {"cat", "ship"}
    for p in pred["probabilities"]:
        assert abs(sum(p) - 1) < 1e-5


def test_audits(api, data):
    images, labels = data
    head_id = api.get("/heads").json()["items"][0]["id"]
    robust = api.post("/audits", json={"kind": "robustness", "head_id": head_id,
                                       "images": images[:3], "labels": labels[:3]}).json()
    retrieval = api.post("/audits", json={"kind": "retrieval", "index": "pets", "k": 3,
                                          "steps": 2, "images": images[:2]}).json()
    for audit in (robust, retrieval):
        assert audit["result_url"] == f"/audits/{audit['job_id']}"
        job = wait_job(api, audit["job_id"])
        assert job["state"] == "succeeded", job["error"]
    report = api.get(robust["result_url"]).json()
    assert report["n"] == 3 and report["robust_accuracy"] <= report["clean_accuracy"]
    report = api.get(f"/audits/{retrieval['job_id']}").json()
    assert report["num_queries"] == 2 and report["gallery_size"] == len(images)


def restore_unacked(stack) -> str:
    """Put the message that a dead worker left unacknowledged back on the queue, as Redis does
    after the visibility timeout (hours under default settings); returns its task id."""
    r = redis.Redis(port=stack.redis_port)
    (tag, raw), = r.hgetall("unacked").items()
    payload, _, _ = json.loads(raw)
    r.lpush("celery", json.dumps(payload))
    r.hdel("unacked", tag)
    r.zrem("unacked_index", tag)
    return payload["headers"]["id"]


def test_a_job_whose_whole_worker_was_killed_runs_again_once(stack, api, data):
    """SIGKILL of a worker's main and pool processes mid-job, the worker alone in its pid
    namespace (as in a container): only its lapsed lease tells the api. Under default settings
    the job runs again on a live worker within 5 minutes, and completes once, even when the dead
    worker's message comes back."""
    images, labels = data
    stack.kill("worker1")  # idle: the job must land on the isolated worker
    stack.start_worker("worker2", isolated=True)
    few = [0, 1, 2, 3, -4, -3, -2, -1]  # 4 of each class: a robust head of a few seconds
    r = api.post("/linear-head", json={"classes": ["cat", "ship"],
                                       "labels": [labels[i] for i in few],
                                       "images": [images[i] for i in few], "robust": True,
                                       "epochs": 10, "attack_steps": 1, "min_steps": 10,
                                       "validation_fraction": 0})
    job_id = r.json()["job_id"]
    job = wait_for(lambda: (j := api.get(f"/jobs/{job_id}").json())["progress"] > 0 and j,
                   120, "the job to make progress")
    assert job["state"] == "running" and job["attempts"] == 1
    stack.kill("worker2")  # SIGKILL to the whole process group, mid-job
    killed = time.monotonic()
    assert api.get(f"/jobs/{job_id}").json()["state"] == "running"

    stack.start_worker("worker3")
    wait_for(lambda: api.get(f"/jobs/{job_id}").json()["attempts"] == 2, RERUN_BOUND_S,
             "the job to run again")
    print(f"running again {time.monotonic() - killed:.0f} s after the SIGKILL")
    job = wait_job(api, job_id, timeout=180)
    assert job["state"] == "succeeded" and job["attempts"] == 2, job["error"]
    assert job_id in [h["id"] for h in api.get("/heads").json()["items"]]

    task_id = restore_unacked(stack)  # the first delivery, which Redis still held
    wait_for(lambda: f"run_job[{task_id}] succeeded" in stack.log("worker3"), 60,
             "the old message to be handled")
    assert api.get(f"/jobs/{job_id}").json() == job  # not run, not completed a second time


def test_api_restart_keeps_indexes_and_heads(stack, api, data):
    images, _ = data
    heads = api.get("/heads").json()["items"]
    indexes = api.get("/indexes").json()["items"]
    before = api.post("/search", json={"index": "pets", "images": images[:1], "k": 5}).json()
    stack.kill("api", signal.SIGTERM)
    stack.start_api()
    assert api.get("/heads").json()["items"] == heads
    assert api.get("/indexes").json()["items"] == indexes
    assert api.post("/search", json={"index": "pets", "images": images[:1], "k": 5}).json() \
        == before
    r = api.post(f"/heads/{heads[0]['id']}/predict", json={"images": images[:2]})
    assert r.status_code == 200 and len(r.json()["labels"]) == 2


def test_a_killed_api_keeps_every_answered_add(stack, api, data):
    """SIGKILL the api while a client adds items one by one: after a restart every add answered
    201 is there, whole; the add in flight is there or not."""
    images, _ = data
    assert api.post("/indexes", json={"name": "live"}).status_code == 201
    answered, in_flight, refused, stop = [], [], [], threading.Event()

    def client():
        with httpx.Client(base_url=stack.url, timeout=30) as c:
            for i in range(100_000):
                key = f"live-{i}"
                try:
                    r = c.post("/indexes/live/items", json={
                        "keys": [key], "images": [images[i % len(images)]],
                        "metadata": [{"i": i}]})
                except httpx.TransportError:
                    in_flight.append(key)
                    return
                if r.status_code != 201:
                    refused.append(r.text)
                    return
                answered.append(key)
                if stop.is_set():
                    return

    thread = threading.Thread(target=client)
    thread.start()
    wait_for(lambda: len(answered) >= 20, 60, "20 answered adds")
    time.sleep(random.uniform(0, 0.5))
    stack.kill("api")
    stop.set()
    thread.join(30)
    assert not refused, refused
    stack.start_api()
    items = api.get("/indexes/live/items", params={"limit": 1000}).json()["items"]
    keys = [item["key"] for item in items]
    assert keys[: len(answered)] == answered and set(keys) <= set(answered + in_flight)
    assert all(item["metadata"] == {"i": int(item["key"][5:])} for item in items)
    hits = api.post("/search", json={"index": "live", "images": images[:1], "k": 1}).json()
    assert hits["results"][0][0]["key"] in keys
