import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from training.data import decode_image
from training.export import load_torch_encoder


def metric(client, name: str) -> float:
    """A sample's value in the Prometheus exposition at /metrics."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


def test_json_and_multipart_give_the_torch_encoders_embeddings(client, model_dir, image_bytes):
    blobs = [bs[0] for bs in image_bytes.values()]
    r = client.post("/embed", json={"images": [base64.b64encode(b).decode() for b in blobs]})
    assert r.status_code == 200, r.text
    body = r.json()
    card = client.get("/models").json()[0]
    assert body["model_id"] == card["model_id"] and body["dim"] == card["embedding_dim"]
    got = np.asarray(body["embeddings"], np.float32)

    files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
    r = client.post("/embed", files=files)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(r.json()["embeddings"], np.float32), got)

    # The reference: the training-side decoder and the PyTorch weights of the same model.
    x = torch.from_numpy(np.stack([decode_image(b, 32) for b in blobs])).float() / 255
    with torch.no_grad():
        ref = load_torch_encoder(model_dir)(x).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


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
