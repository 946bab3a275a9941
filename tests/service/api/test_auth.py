"""The API key: checked before the body is read, declared in OpenAPI only when configured."""

import pytest
from fastapi.testclient import TestClient

from byorl.service.main import create_app
from byorl.service.settings import Settings

OPEN = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/demo")


@pytest.fixture(scope="module")
def keyed(settings):
    keyed = Settings(model_dir=settings.model_dir, data_dir=settings.data_dir, threads=1,
                     api_key="s3cret", max_body_bytes=2**20)
    with TestClient(create_app(keyed)) as c:
        yield c


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}])
def test_no_key_is_a_401_before_the_body_is_read(keyed, headers):
    json_type = {"content-type": "application/json", **headers}
    for body in (b'{"images": [', b"x" * (2**20 + 1)):  # malformed; over the body limit
        r = keyed.post("/embed", content=body, headers=json_type)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    assert keyed.get("/indexes", headers=headers).status_code == 401
    assert keyed.get("/no-such-route", headers=headers).status_code == 401


def test_the_right_key_reaches_the_app_and_probes_and_docs_need_none(keyed):
    key = {"X-API-Key": "s3cret"}
    r = keyed.post("/embed", content=b'{"images": [', headers={**key, "content-type":
                                                               "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert keyed.get("/indexes", headers=key).status_code == 200
    for path in OPEN:
        assert keyed.get(path).status_code == 200, path


def test_openapi_declares_the_key_where_it_is_checked(keyed):
    spec = keyed.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, operations in spec["paths"].items():
        for op in operations.values():
            if path in OPEN:
                assert "security" not in op, path
            else:
                assert op["security"] == [{"ApiKey": []}] and "401" in op["responses"], path


def test_openapi_declares_no_key_when_none_is_configured(client):
    spec = client.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    text = client.get("/openapi.json").text
    assert "X-API-Key" not in text and '"security"' not in text
    assert client.get("/indexes").status_code == 200


@pytest.mark.parametrize("authorization", ["Bearer s3cret", "bearer   s3cret"])
def test_a_bearer_token_is_the_key_as_openai_clients_send_it(keyed, authorization):
    assert keyed.get("/indexes", headers={"Authorization": authorization}).status_code == 200
    for wrong in ("Bearer nope", "Basic s3cret", "Bearer", "s3cret"):
        assert keyed.get("/indexes", headers={"Authorization": wrong}).status_code == 401
