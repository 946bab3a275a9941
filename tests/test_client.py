"""`byorl.Client` and `AsyncClient` against a live uvicorn (real sockets, real ONNX Runtime,
embedded jobs): every operation, errors as the service's codes, automatic paging, job waits,
and retries on 429 that honour Retry-After."""

import asyncio
import io

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import byorl.client
from byorl.client import AsyncClient, Client, JobFailed, ServiceError, encode_image
from byorl.model_dir import embed, load_onnx_session
from tests.live import kill_group, start_service

KEY = "client-test-key"


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    """A keyed service."""
    url, proc = start_service(model_dir, tmp_path_factory.mktemp("client"), api_key=KEY)
    yield url
    kill_group(proc)


@pytest.fixture(scope="module")
def client(service):
    with Client(service, api_key=KEY) as c:
        yield c


@pytest.fixture(scope="module")
def images(image_bytes) -> tuple[list[bytes], list[int]]:
    """Two classes of 8 JPEG files each (bytes) and their labels."""
    groups = list(image_bytes.values())
    return groups[3][:8] + groups[8][:8], [0] * 8 + [1] * 8


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def test_every_image_form_embeds_as_the_model_does(client, model_dir, images, tmp_path):
    jpeg = images[0][0]
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg)
    hwc = pixels(jpeg)
    forms = [path, str(path), jpeg, Image.open(io.BytesIO(jpeg)), hwc, hwc.transpose(2, 0, 1)]
    got = client.embed(forms)
    assert got.normalized and got.vectors.shape == (6, 256)
    ref = embed(load_onnx_session(model_dir, threads=1), hwc.transpose(2, 0, 1)[None])[0]
    ref /= np.linalg.norm(ref)
    np.testing.assert_allclose(got.vectors[:2], [ref, ref], atol=1e-5)  # the file, as it is
    np.testing.assert_allclose(got.vectors[2], ref, atol=1e-5)
    np.testing.assert_allclose(got.vectors[3:], np.stack([ref] * 3), atol=1e-5)  # lossless PNG
    raw = client.embed([jpeg], normalize=False)
    assert not raw.normalized
    np.testing.assert_allclose(raw.vectors[0] / np.linalg.norm(raw.vectors[0]), ref, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.float32))


def test_a_gallery_from_creation_to_deletion(client, service, images, monkeypatch):
    blobs, labels = images
    gallery = client.create_gallery("pets")
    assert (gallery.name, gallery.count, gallery.factory) == ("pets", 0, "Flat")
    keys = [f"img-{i:02d}" for i in range(len(blobs))]
    count = client.add("pets", dict(zip(keys, blobs, strict=True)), batch=5,  # 4 requests
                       metadata={k: {"label": y} for k, y in zip(keys, labels, strict=True)})
    assert count == 16 == client.gallery("pets").count
    monkeypatch.setattr(byorl.client, "PAGE", 3)  # 6 pages of the listing
    listed = client.items("pets")
    assert [i.key for i in listed] == keys and listed[9].metadata == {"label": 1}
    hits = client.search("pets", [blobs[5]], k=3)[0]
    assert hits[0].key == "img-05" and hits[0].score == pytest.approx(1, abs=1e-4)
    assert hits[0].metadata == {"label": 0} and len(hits) == 3
    vector = client.embed([blobs[9]]).vectors
    assert client.search("pets", embeddings=vector, k=1)[0][0].key == "img-09"
    # a filter applies before k: img-09's label is 1, the nearest label-0 item is another
    hits = client.search("pets", embeddings=vector, k=20, filter={"label": 0})[0]
    assert len(hits) == 8 and {h.metadata["label"] for h in hits} == {0}

    async def filtered():  # the same plan under asyncio
        async with AsyncClient(service, api_key=KEY) as c:
            return await c.search("pets", embeddings=vector, k=20, filter={"label": 0})

    assert asyncio.run(filtered()) == [hits]
    assert client.search("pets", [blobs[9]], k=2, filter={"label": {"in": [1]}})[0][0].key == \
        "img-09"
    with pytest.raises(ServiceError) as refused:
        client.search("pets", embeddings=vector, filter={"label": [0]})
    assert (refused.value.status, refused.value.code) == (422, "validation_error")
    assert client.remove("pets", "img-00") == 15
    assert "pets" in [g.name for g in client.galleries()]
    client.delete_gallery("pets")
    with pytest.raises(ServiceError) as refused:
        client.gallery("pets")
    assert (refused.value.status, refused.value.code) == (404, "index_not_found")


def test_heads_audits_and_jobs(client, images):
    blobs, labels = images
    seen = []
    handle = client.fit_head(["cat", "ship"], labels, blobs, epochs=3, min_steps=20)
    assert handle.result_url == f"/heads/{handle.job_id}"
    job = handle.wait(timeout=300, poll=0.2, progress=seen.append)
    assert job.state == "succeeded" and job.result["head_id"] == handle.job_id
    assert seen[-1] == job and all(0 <= j.progress <= 1 for j in seen)
    head = client.head(handle.job_id)
    assert head["classes"] == ["cat", "ship"] and head in client.heads()
    pred = client.predict(handle.job_id, blobs[:4])
    np.testing.assert_allclose(pred.probabilities.sum(1), 1, atol=1e-5)
    assert pred.classes == [["cat", "ship"][y] for y in pred.labels]
    audit = client.audit("robustness", blobs[:2], head_id=handle.job_id, labels=labels[:2],
                         mode="quick")
    audit.wait(timeout=300, poll=0.2)
    report = client.report(audit.job_id)
    assert report["n"] == 2 and report["mode"] == "quick"
    assert {j.id for j in client.jobs()} >= {handle.job_id, audit.job_id}
    assert client.job(audit.job_id).done

    # A wait shorter than the job raises TimeoutError; an audit whose head is deleted before
    # its job runs fails, saying why.
    with pytest.raises(TimeoutError, match="still"):
        client.fit_head(["cat", "ship"], labels, blobs, epochs=3, min_steps=20).wait(
            timeout=0.01, poll=0.01)
    orphan = client.audit("robustness", blobs[:2], head_id=handle.job_id, labels=labels[:2])
    client.delete_head(handle.job_id)
    with pytest.raises(JobFailed) as failed:
        orphan.wait(timeout=300, poll=0.2)
    assert failed.value.job.state == "failed" and handle.job_id in failed.value.job.error
    with pytest.raises(ServiceError, match="head_not_found"):
        client.head(handle.job_id)


def test_models_upload_list_and_delete(client, user_onnx):
    card = client.upload_model(user_onnx, {"name": "stem", "input_size": 32})
    assert card["model_id"].startswith("stem-") and card["source"] == "user"
    assert card["model_id"] in [m["model_id"] for m in client.models()]
    vectors = client.embed([np.zeros((32, 32, 3), np.uint8)], model=card["model_id"]).vectors
    assert vectors.shape[0] == 1
    client.delete_model(card["model_id"])
    assert card["model_id"] not in [m["model_id"] for m in client.models()]


def test_refusals_raise_with_the_services_code(service, client):
    with Client(service) as keyless, pytest.raises(ServiceError) as refused:
        keyless.models()
    assert refused.value.status == 401
    client.create_gallery("dup")
    with pytest.raises(ServiceError) as refused:
        client.create_gallery("dup")
    assert (refused.value.status, refused.value.code) == (409, "conflict")
    with pytest.raises(ServiceError, match="validation_error"):
        client.search("dup", embeddings=[[1.0, 2.0]], k=0)


def requests_by_status(url: str, status: str) -> float:
    import httpx

    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return sum(s.value for f in families if f.name == "byorl_requests" for s in f.samples
               if s.name == "byorl_requests_total" and s.labels["status"] == status)


def test_a_full_queue_is_retried_after_retry_after(model_dir, tmp_path, images):
    """The service refuses what would overfill its embedding queue (429, Retry-After): the
    async client waits as told and every request goes through; without retries the refusal
    reaches the caller as `queue_full`."""
    url, proc = start_service(model_dir, tmp_path, max_queued_images=1, max_batch=1)
    blobs = images[0][:2]

    async def burst(retries: int):
        async with AsyncClient(url, retries=retries) as c:
            return await asyncio.gather(*(c.embed(blobs) for _ in range(6)),
                                        return_exceptions=True)

    try:
        done = asyncio.run(burst(retries=8))
        assert all(r.vectors.shape == (2, 256) for r in done), done
        assert requests_by_status(url, "429") > 0  # refused at first, retried
        refused = [r for r in asyncio.run(burst(retries=0)) if isinstance(r, Exception)]
        assert refused and all(isinstance(r, ServiceError) and r.code == "queue_full"
                               for r in refused)
    finally:
        kill_group(proc)
