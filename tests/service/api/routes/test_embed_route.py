import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from fastapi.testclient import TestClient

from byorl.service.main import create_app
from byorl.training.checkpoint import load_torch_encoder
from byorl.training.data import decode_image
from tests.live import healthz_during, tiny_huge_webp


def metric(client, name: str) -> float:
    """A sample's value in the Prometheus exposition at /metrics."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


def test_json_and_multipart_give_the_torch_encoders_embeddings(client, model_dir, image_bytes):
    blobs = [bs[0] for bs in image_bytes.values()]
    images = [base64.b64encode(b).decode() for b in blobs]
    r = client.post("/embed", json={"images": images, "normalize": False})
    assert r.status_code == 200, r.text
    body = r.json()
    card = client.get("/models").json()[0]
    assert body["model_id"] == card["model_id"] and body["dim"] == card["embedding_dim"]
    assert body["normalized"] is False
    got = np.asarray(body["embeddings"], np.float32)

    files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
    r = client.post("/embed", files=files, data={"normalize": "false"})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(r.json()["embeddings"], np.float32), got)

    # The reference: the training-side decoder and the PyTorch weights of the same model.
    x = torch.from_numpy(np.stack([decode_image(b, 32) for b in blobs])).float() / 255
    with torch.no_grad():
        ref = load_torch_encoder(model_dir)(x).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)

    # By default (JSON or multipart), the same directions as unit vectors, and said so.
    unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    for r in (client.post("/embed", json={"images": images}), client.post("/embed", files=files),
              client.post("/embed", files=files, data={"normalize": "true"})):
        assert r.status_code == 200 and r.json()["normalized"] is True
        vectors = np.asarray(r.json()["embeddings"], np.float32)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(vectors, unit, atol=1e-5)


def test_bad_normalize_is_a_422(client, image_bytes):
    blob = next(iter(image_bytes.values()))[0]
    image = base64.b64encode(blob).decode()
    for r in (client.post("/embed", json={"images": [image], "normalize": "maybe"}),
              client.post("/embed", files=[("files", ("a.jpg", blob, "image/jpeg"))],
                          data={"normalize": "maybe"})):
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "validation_error" and "normalize" in error["message"]


def test_every_image_goes_through_the_batcher_once(client, image_bytes):
    images_before = metric(client, "byorl_batch_images_sum")
    calls_before = metric(client, "byorl_batch_images_count")
    one = base64.b64encode(next(iter(image_bytes.values()))[0]).decode()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(
            lambda _: client.post("/embed", json={"images": [one, one]}).status_code, range(16)))
    assert codes == [200] * 16
    assert metric(client, "byorl_batch_images_sum") - images_before == 32
    assert 1 <= metric(client, "byorl_batch_images_count") - calls_before <= 16


def test_a_chunked_multipart_body_over_the_limit_is_a_413(client, settings):
    """No Content-Length: the limit is found while the form streams, and answered as a 413."""
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    chunks = [head] + [b"x" * 65536] * (settings.max_body_bytes // 65536 + 2)
    r = client.post("/embed", content=iter(chunks),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"


def test_a_full_embedding_queue_is_a_429_with_retry_after(settings, image_bytes):
    """One request in the model (held there), 4 images waiting at a bound of 4: the next
    request is refused with Retry-After, and the held ones are answered once the model runs."""
    one = base64.b64encode(next(iter(image_bytes.values()))[0]).decode()
    bounded = settings.model_copy(update={"max_queued_images": 4, "max_batch": 4})
    with TestClient(create_app(bounded)) as c, ThreadPoolExecutor(2) as pool:
        batcher = c.app.state.byorl.models.default.batcher
        gate, entered, model = threading.Event(), threading.Event(), batcher.run

        def held(x):
            entered.set()
            gate.wait(60)
            return model(x)

        batcher.run = held
        queued_before = metric(c, "byorl_batch_queue_images")
        first = pool.submit(c.post, "/embed", json={"images": [one]})
        assert entered.wait(60)
        second = pool.submit(c.post, "/embed", json={"images": [one] * 4})
        deadline = time.monotonic() + 60
        while metric(c, "byorl_batch_queue_images") < queued_before + 4:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        r = c.post("/embed", json={"images": [one]})
        gate.set()
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        assert [f.result().status_code for f in (first, second)] == [200, 200]
        assert c.post("/embed", json={"images": [one]}).status_code == 200


def test_docs_show_the_429_of_every_route_that_embeds(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/embed", "/search", "/indexes/{name}/items", "/heads/{head_id}/predict"):
        assert "Retry-After" in paths[path]["post"]["responses"]["429"]["headers"], path


def test_decoding_never_blocks_the_event_loop(live_api):
    """Three 944-character WebPs (a 3 KB body) decode to 50 Mpixels, seconds of CPU: they were
    decoded on the event loop (bodies under 64 KB), and /healthz waited all that time."""
    images = [tiny_huge_webp()] * 3
    answer, took, longest = healthz_during(live_api.url, lambda: httpx.post(
        live_api.url + "/embed", json={"images": images}, timeout=300))
    assert answer.status_code == 200, answer.text
    assert longest < max(0.5, took / 3), f"/healthz waited {longest:.2f} s of {took:.2f} s"


def test_the_decoded_pixels_of_a_request_are_bounded_from_the_headers(live_api):
    """Five of them (84 Mpixels) pass MAX_REQUEST_PIXELS (64 Mi): refused from their headers,
    before any is decoded: in less time than decoding one of them takes, a fifth of what
    decoding all five would (measured side by side: a ratio, whatever the machine's load)."""
    def timed(count: int) -> tuple[httpx.Response, float]:
        start = time.monotonic()
        r = httpx.post(live_api.url + "/embed", json={"images": [tiny_huge_webp()] * count},
                       timeout=300)
        return r, time.monotonic() - start

    decoded, one = timed(1)
    assert decoded.status_code == 200, decoded.text
    r, five = timed(5)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels", r.text
    assert "MAX_REQUEST_PIXELS" in r.json()["error"]["message"]
    assert five < one, f"refusing five took {five:.2f} s, decoding one {one:.2f} s"
