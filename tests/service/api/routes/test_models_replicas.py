"""Users' models across api replicas: two uvicorn processes on one data directory and one
database (SQLite, and PostgreSQL) share the model registry. What one registers the other serves
at its first request and lists within MODEL_REFRESH_S; what one deletes the other refuses
within MODEL_REFRESH_S; concurrent identical uploads through both make one model. Nothing is
mocked."""

import base64
import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.conftest import flatten_onnx
from tests.live import free_port, kill_group, start_process, uvicorn_argv, wait_for, wait_ready

REFRESH_S = 1.0
SLACK_S = 4.0  # a refresh round's own time (query, model load) on a loaded 2-core machine


@pytest.fixture
def replicas(model_dir, database_url, tmp_path):
    env = {**os.environ, "BYORL_MODEL_DIR": str(model_dir), "BYORL_DATA_DIR": str(tmp_path),
           "BYORL_REDIS_URL": "", "BYORL_API_KEY": "", "BYORL_THREADS": "1",
           "BYORL_DATABASE_URL": database_url, "BYORL_MODEL_REFRESH_S": str(REFRESH_S)}
    procs, urls = [], []
    try:
        for name in ("a", "b"):
            port = free_port()
            procs.append(start_process(uvicorn_argv(port), env, tmp_path / f"{name}.log",
                                       tmp_path))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_ready(url, timeout=180)
        yield [httpx.Client(base_url=url, timeout=120) for url in urls]
    finally:
        for proc in procs:
            kill_group(proc, signal.SIGTERM)


def upload(c: httpx.Client, data: bytes, name: str) -> httpx.Response:
    return c.post("/models", data={"card": json.dumps({"name": name, "input_size": 8})},
                  files={"file": ("m.onnx", data, "application/octet-stream")})


def listed(c: httpx.Client) -> list[str]:
    return [m["model_id"] for m in c.get("/models").json()]


def within(check, bound: float, what: str) -> float:
    """Seconds until `check()` held (an AssertionError past `bound`)."""
    start = time.monotonic()
    wait_for(check, bound, what)
    return time.monotonic() - start


def grey_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PIXELS = {"images": [grey_png()]}


def test_a_model_uploaded_on_one_replica_is_served_and_deleted_on_the_other(replicas):
    a, b = replicas
    r = upload(a, flatten_onnx("LpNormalization", axis=1, p=2), "shared")
    assert r.status_code == 201, r.text
    model_id = r.json()["model_id"]
    took = within(lambda: model_id in listed(b), REFRESH_S + SLACK_S, "B to list the model")
    assert took <= REFRESH_S + SLACK_S
    assert model_id in [m["id"] for m in b.get("/v1/models").json()["data"]]
    on_a = a.post("/embed", json={**PIXELS, "model": model_id}).json()
    on_b = b.post("/embed", json={**PIXELS, "model": model_id}).json()
    assert on_b["model_id"] == model_id and on_b["embeddings"] == on_a["embeddings"]
    assert a.delete(f"/models/{model_id}").status_code == 204
    within(lambda: b.post("/embed", json={**PIXELS, "model": model_id}).status_code == 404,
           REFRESH_S + SLACK_S, "B to refuse the deleted model")
    assert model_id not in listed(b)
    r = b.delete(f"/models/{model_id}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_request_on_another_replica_finds_a_new_model_at_once(replicas):
    """No waiting for the refresh: a request naming the model asks the registry."""
    a, b = replicas
    model_id = upload(a, flatten_onnx("LpNormalization", axis=1, p=1), "direct").json()["model_id"]
    r = b.post("/embed", json={**PIXELS, "model": model_id})
    assert r.status_code == 200 and r.json()["model_id"] == model_id, r.text
    assert b.get(f"/models/{model_id}").json()["source"] == "user"
    assert b.delete(f"/models/{model_id}").status_code == 204  # deleted through B
    assert a.post("/embed", json={**PIXELS, "model": model_id}).status_code in (200, 404)
    within(lambda: model_id not in listed(a), REFRESH_S + SLACK_S, "A to drop it")


def test_concurrent_identical_uploads_on_two_replicas_make_one_model(replicas):
    data = flatten_onnx("LpNormalization", axis=1, p=2, side=8)
    start = threading.Barrier(6)

    def post(i):
        start.wait()  # all six at the same instant, three on each replica
        return upload(replicas[i % 2], data, "racer")

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    assert sorted(r.status_code for r in answers) == [201] + [409] * 5, [r.text for r in answers]
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 409} \
        == {"model_exists"}
    model_id = next(r.json()["model_id"] for r in answers if r.status_code == 201)
    for c in replicas:
        within(lambda c=c: listed(c).count(model_id) == 1, REFRESH_S + SLACK_S, "the listing")
