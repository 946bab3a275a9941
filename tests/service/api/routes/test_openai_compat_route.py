"""POST /v1/embeddings and GET /v1/models as the official `openai` client calls them (a live
uvicorn): the same vectors as /embed, floats or base64, usage counting images."""

import base64

import httpx
import numpy as np
import openai
import pytest


@pytest.fixture(scope="module")
def oai(live_api) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_api.url + "/v1", api_key="unused", max_retries=0)


def data_url(image: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image).decode()


def test_the_openai_client_gets_the_vectors_of_embed(oai, live_api, image_bytes):
    blobs = list(image_bytes.values())[0][:3]
    model = oai.models.list().data[0].id
    native = httpx.post(live_api.url + "/embed", json={
        "images": [base64.b64encode(b).decode() for b in blobs]}).json()
    assert native["model_id"] == model
    for encoding in ({"encoding_format": "float"}, {}):  # the default: base64, decoded by it
        got = oai.embeddings.create(model=model, input=[data_url(b) for b in blobs], **encoding)
        assert [d.index for d in got.data] == [0, 1, 2] and got.model == model
        assert got.usage.prompt_tokens == got.usage.total_tokens == 3
        vectors = np.array([d.embedding for d in got.data])
        np.testing.assert_allclose(vectors, native["embeddings"], atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    one = oai.embeddings.create(model=model, input=base64.b64encode(blobs[0]).decode())
    np.testing.assert_allclose(one.data[0].embedding, native["embeddings"][0], atol=1e-6)


def test_base64_vectors_are_little_endian_float32(live_api, image_bytes):
    blob = list(image_bytes.values())[0][0]
    model = httpx.get(live_api.url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "input": [data_url(blob)]}
    floats = httpx.post(live_api.url + "/v1/embeddings", json=body).json()
    packed = httpx.post(live_api.url + "/v1/embeddings",
                        json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(decoded, np.float32(floats["data"][0]["embedding"]))


def test_refusals_reach_the_openai_client_with_their_code(oai, image_bytes):
    model = oai.models.list().data[0].id
    image = data_url(list(image_bytes.values())[0][0])
    refusals = [(openai.UnprocessableEntityError, "dimensions_unsupported",
                 {"model": model, "input": [image], "dimensions": 64}),
                (openai.NotFoundError, "model_not_found", {"model": "no-such", "input": [image]}),
                (openai.UnprocessableEntityError, "invalid_base64",
                 {"model": model, "input": ["not base64!"]})]
    for error, code, request in refusals:
        with pytest.raises(error) as refused:
            oai.embeddings.create(**request)
        assert refused.value.body["code"] == code  # the error object, as OpenAI's clients read it
    assert oai.embeddings.create(model=model, input=[image], dimensions=256).data
