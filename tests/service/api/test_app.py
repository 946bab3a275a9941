"""The app as a whole: every bad input is a clear 4xx in one JSON shape, auth, probes, docs."""

import base64
import io

import httpx
import onnxruntime as ort
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from byorl.service.main import create_app
from byorl.service.settings import Settings


def png_b64(size=(32, 32)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


FUZZ_EXAMPLES = 30  # per operation, at most: about 450 requests in all
NEGATIVE_EXAMPLES = 15  # invalid data per operation, at most: about 250 more

IMG = png_b64()
HEAD = {"classes": ["a", "b"], "labels": [0, 1], "images": [IMG, IMG]}

# (method, path, request keyword arguments, status, error code)
BAD = [
    ("post", "/embed", {"content": b'{"images": [', "headers": {"content-type":
                                                                "application/json"}},
     400, "invalid_json"),
    ("post", "/search", {"content": b"{,}", "headers": {"content-type": "application/json"}},
     400, "invalid_json"),
    ("post", "/embed", {"json": {"images": [base64.b64encode(b"hello").decode()]}},
     422, "invalid_image"),
    ("post", "/embed", {"json": {"images": ["@@@"]}}, 422, "invalid_base64"),
    ("post", "/embed", {"json": {"images": [png_b64((4, 4))]}}, 422, "image_too_small"),
    ("post", "/embed", {"json": {"images": [IMG] * 17}}, 413, "too_many_images"),
    ("post", "/embed", {"files": [("files", (f"{i}.png", base64.b64decode(IMG), "image/png"))
                                  for i in range(17)]}, 413, "too_many_images"),
    ("post", "/embed", {"json": {}}, 422, "validation_error"),
    ("post", "/embed", {"json": {"images": []}}, 422, "validation_error"),
    ("post", "/embed", {"content": b"hi", "headers": {"content-type": "text/plain"}},
     415, "unsupported_media_type"),
    ("post", "/embed", {"content": b"x" * (2**20 + 1), "headers": {"content-type":
                                                                   "application/json"}},
     413, "payload_too_large"),
    ("post", "/embed", {"content": (b"x" * 65536 for _ in range(17)),  # chunked, no length
                        "headers": {"content-type": "application/json"}},
     413, "payload_too_large"),
    ("post", "/search", {"json": {"index": "nope", "images": [IMG]}}, 404, "index_not_found"),
    ("post", "/search", {"json": {"index": "bad", "embeddings": [[0.1] * 7]}},
     422, "dimension_mismatch"),
    ("post", "/search", {"json": {"index": "bad", "embeddings": [[0.0] * 256]}},
     422, "invalid_vector"),
    ("post", "/search", {"json": {"index": "bad", "images": [IMG], "embeddings": [[1.0]]}},
     422, "validation_error"),
    ("post", "/search", {"json": {"index": "bad", "images": [IMG], "k": 0}},
     422, "validation_error"),
    ("post", "/indexes/nope/items", {"json": {"keys": ["a"], "images": [IMG]}},
     404, "index_not_found"),
    ("post", "/indexes/bad/items", {"json": {"keys": ["one"], "images": [IMG]}},
     409, "duplicate_key"),
    ("post", "/indexes/bad/items", {"json": {"keys": ["x", "y"], "images": [IMG]}},
     422, "validation_error"),
    ("post", "/indexes", {"json": {"name": "bad"}}, 409, "conflict"),
    ("post", "/indexes", {"json": {"name": "../etc"}}, 422, "validation_error"),
    ("post", "/indexes", {"json": {"name": "x", "factory": "Nonsense99"}},
     422, "invalid_factory"),
    # FAISS allocated what these say (at 256 dimensions: 100 MB, 64 MB), here and at each start
    ("post", "/indexes", {"json": {"name": "x", "factory": "IVF100000,Flat"}},
     422, "factory_out_of_bounds"),
    ("post", "/indexes", {"json": {"name": "x", "factory": "PQ8x16"}},
     422, "factory_out_of_bounds"),
    ("delete", "/indexes/bad/items/no-such-key", {}, 404, "key_not_found"),
    ("delete", "/indexes/nope", {}, 404, "index_not_found"),
    ("get", "/jobs/0123abcd", {}, 404, "job_not_found"),
    ("get", "/jobs/..secret", {}, 404, "job_not_found"),
    ("get", "/heads/.hidden", {}, 404, "head_not_found"),
    ("get", "/heads/nope", {}, 404, "head_not_found"),
    ("delete", "/heads/nope", {}, 404, "head_not_found"),
    ("post", "/heads/nope/predict", {"json": {"images": [IMG]}}, 404, "head_not_found"),
    ("get", "/audits/nope", {}, 404, "audit_not_found"),
    ("post", "/linear-head", {"json": {**HEAD, "labels": [0, 2]}}, 422, "label_out_of_range"),
    ("post", "/linear-head", {"json": {**HEAD, "labels": [-1, 0]}}, 422, "label_out_of_range"),
    ("post", "/linear-head", {"json": {**HEAD, "labels": [1, 1]}}, 422, "single_class"),
    ("post", "/linear-head", {"json": {**HEAD, "labels": [0, 1, 1]}}, 422, "validation_error"),
    ("post", "/linear-head", {"json": {**HEAD, "robsut": True}}, 422, "validation_error"),
    ("post", "/linear-head", {"json": {**HEAD, "threat": {"norm": "l2", "eps": -1}}},
     422, "validation_error"),
    ("post", "/linear-head", {"json": {**HEAD, "images": [IMG, "@@"]}}, 422, "invalid_base64"),
    ("post", "/linear-head", {"json": {"classes": ["a", "b"], "labels": [0, 1], "index": "bad",
                                       "keys": ["one", "missing"]}}, 404, "key_not_found"),
    ("post", "/linear-head", {"json": {"classes": ["a", "b"], "labels": [0, 1], "index": "nope",
                                       "keys": ["one", "two"]}}, 404, "index_not_found"),
    ("post", "/audits", {"json": {"kind": "robustness", "head_id": "nope", "images": [IMG],
                                  "labels": [0]}}, 404, "head_not_found"),
    ("post", "/audits", {"json": {"kind": "retrieval", "index": "nope", "images": [IMG]}},
     404, "index_not_found"),
    ("post", "/audits", {"json": {"kind": "retrieval", "index": "empty", "images": [IMG]}},
     422, "empty_index"),
    ("post", "/audits", {"json": {"kind": "poison", "images": [IMG]}}, 422, "validation_error"),
    ("get", "/no-such-route", {}, 404, "not_found"),
    ("put", "/embed", {}, 405, "method_not_allowed"),
    ("get", "/indexes/bad/items", {"params": {"offset": 9223372036854775800, "limit": 10}},
     422, "validation_error"),
]


@pytest.fixture(scope="module")
def bad_setup(client):
    assert client.post("/indexes", json={"name": "bad"}).status_code == 201
    assert client.post("/indexes", json={"name": "empty"}).status_code == 201
    r = client.post("/indexes/bad/items", json={"keys": ["one", "two"], "images": [IMG, IMG],
                                                "metadata": [{"n": 1}, None]})
    assert r.status_code == 201


@pytest.mark.parametrize("method,path,kwargs,status,code", BAD,
                         ids=[f"{m} {p} {c}" for m, p, _, _, c in BAD])
def test_bad_input_is_a_clear_4xx(client, bad_setup, method, path, kwargs, status, code):
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]


def test_decompression_bomb_is_a_413(client, bomb):
    r = client.post("/embed", json={"images": [base64.b64encode(bomb).decode()]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"


def test_bad_input_lost_nothing(client, bad_setup):
    """After every refused request above, the index holds what it held, and no job ran."""
    assert client.get("/indexes/bad").json()["count"] == 2
    items = client.get("/indexes/bad/items").json()["items"]
    assert items == [{"key": "one", "metadata": {"n": 1}}, {"key": "two", "metadata": None}]
    hits = client.post("/search", json={"index": "bad", "images": [IMG], "k": 2}).json()
    assert {h["key"] for h in hits["results"][0]} == {"one", "two"}
    assert client.get("/jobs").json()["items"] == []


def test_probes_models_metrics_and_docs(client, model_dir):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and all(ready["checks"].values())
    gpu_build = "CUDAExecutionProvider" in ort.get_available_providers()
    assert ready["device"] in (("cuda", "cpu") if gpu_build else ("cpu",))  # where it runs
    card = client.get("/models").json()
    assert len(card) == 1 and card[0]["embedding_dim"] == 256
    assert card[0]["onnx_sha256"] and card[0]["input_size"] == [3, 32, 32]

    client.post("/embed", json={"images": [IMG]})
    text = client.get("/metrics").text
    for name in ("byorl_requests_total", "byorl_request_seconds_bucket", "byorl_batch_images",
                 "byorl_batch_queue_images", "byorl_job_queue_depth"):
        assert name in text
    assert 'route="/embed",status="200"' in text

    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/embed"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert {"/search", "/linear-head", "/audits", "/jobs/{job_id}",
            "/heads/{head_id}/predict"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_broker_unreachable_is_not_ready(model_dir, tmp_path):
    settings = Settings(model_dir=model_dir, data_dir=tmp_path, threads=1,
                        redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"] is False
        r = c.post("/linear-head", json=HEAD)
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"


@pytest.fixture(scope="module", params=["embedded", "postgresql-milvus"])
def api_schema(request, labeled):
    """The live api's own OpenAPI document, with a gallery of a few items to find: the api
    embedded (SQLite, FAISS galleries), or configured as a scaled-out replica (PostgreSQL,
    galleries on Milvus)."""
    live_api = request.getfixturevalue("live_api" if request.param == "embedded"
                                       else "live_api_scaled")
    images = labeled[0][:3]
    with httpx.Client(base_url=live_api.url) as c:
        assert c.post("/indexes", json={"name": "gallery"}).status_code == 201
        assert c.post("/indexes/gallery/items", json={
            "keys": ["a", "b", "c"], "images": images,
            "metadata": [{"n": i} for i in range(3)]}).status_code == 201
    return schemathesis.openapi.from_url(live_api.url + "/openapi.json")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def fuzz(operation, mode: GenerationMode) -> dict[int, int]:
    """Generated requests to one operation (positive: data that fits the schema, up to
    FUZZ_EXAMPLES; negative: data that does not, up to NEGATIVE_EXAMPLES), each answer checked;
    returns how many got each status. (Hypothesis driven directly: schemathesis's pytest plugin
    predates pytest 9.2.)"""
    statuses: dict[int, int] = {}
    examples = FUZZ_EXAMPLES if mode == GenerationMode.POSITIVE else NEGATIVE_EXAMPLES

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        status = case.call_and_validate(checks=CHECKS).status_code
        statuses[status] = statuses.get(status, 0) + 1

    check()
    return statuses


def fuzz_all(api_schema, mode: GenerationMode) -> tuple[int, dict, dict]:
    """(operations, requests by status, failures by operation) of fuzzing every operation."""
    failures, statuses = {}, {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation in operations:
        try:
            for status, n in fuzz(operation, mode).items():
                statuses[status] = statuses.get(status, 0) + n
        except Unsatisfiable:  # nothing in it to break (no body, no constrained parameter)
            assert mode == GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # noqa: BLE001 (every operation is tried; all failures shown)
            failures[operation.label] = str(exc)[:2000]
    print(f"{mode}: {len(operations)} operations, {sum(statuses.values())} requests: {statuses}")
    return len(operations), statuses, failures


def test_fuzzed_requests_get_no_5xx_and_answers_match_the_schema(api_schema):
    """Schemathesis against the real uvicorn, every operation of the OpenAPI document."""
    operations, statuses, failures = fuzz_all(api_schema, GenerationMode.POSITIVE)
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert operations >= 20 and sum(statuses.values()) >= 200
    assert {200, 201, 404, 422} <= set(statuses)  # found things, made things, and refused


def test_invalid_fuzzed_requests_are_refused_with_4xx(api_schema):
    """The same with schemathesis's negative generation: data that breaks the schema (wrong
    types, out-of-range numbers, missing fields), each a 4xx in the documented shape."""
    operations, statuses, failures = fuzz_all(api_schema, GenerationMode.NEGATIVE)
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert sum(statuses.values()) >= 100 and not [s for s in statuses if s >= 500]
    assert 422 in statuses
