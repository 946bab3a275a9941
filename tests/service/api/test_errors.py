"""Errors as clients and operators see them: documented in OpenAPI in the one error shape, and
a client that hangs up is no server error (real uvicorn, real sockets)."""

import json
import socket
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from byorl.service.api.errors import _service_error
from byorl.service.exceptions import (
    Busy,
    Conflict,
    Invalid,
    NotFound,
    ServiceError,
    TooLarge,
    Unavailable,
)
from tests.live import wait_for

# (path, content type, the start of a body that never arrives whole)
HANG_UPS = [
    ("/embed", "application/json", b'{"images": ["'),
    ("/embed", "multipart/form-data; boundary=zz",
     b'--zz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'),
    ("/search", "application/json", b'{"index": "'),
]


def request_counts(url: str) -> dict[tuple[str, str], float]:
    """(route, status) -> requests, from the api's Prometheus metrics."""
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return {(s.labels["route"], s.labels["status"]): s.value
            for f in families if f.name == "byorl_requests" for s in f.samples
            if s.name == "byorl_requests_total"}


def test_a_client_hanging_up_mid_body_is_no_server_error(live_api):
    host, port = urlsplit(live_api.url).hostname, urlsplit(live_api.url).port
    for path, content_type, start in HANG_UPS:
        with socket.create_connection((host, port)) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: 100000\r\n\r\n".encode() + start + b"A" * 1000)
    wait_for(lambda: request_counts(live_api.url).get(("/embed", "499")) == 2
             and request_counts(live_api.url).get(("/search", "499")) == 1, 30,
             "three requests counted as closed by the client (499)")
    counts = request_counts(live_api.url)
    assert not [k for k in counts if k[1] >= "500"], counts
    log = live_api.log.read_text()
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]


def test_every_error_status_is_documented_in_the_error_shape(client):
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's own shape
    error = {"$ref": "#/components/schemas/ErrorBody"}
    expected = {("/search", "post"): {"400", "404", "409", "413", "422"},
                ("/embed", "post"): {"400", "413", "415", "422"},
                ("/linear-head", "post"): {"400", "404", "409", "413", "422", "503"},
                ("/indexes/{name}/items", "get"): {"404", "413", "422"},
                ("/jobs/{job_id}", "get"): {"404"}}
    for (path, method), statuses in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, set(responses))
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"] == error


def test_each_refusal_below_the_api_gets_its_status_and_code():
    """The wings raise the service's exceptions; this module alone gives them HTTP statuses."""
    refusals = [(Invalid("no_images", "m"), 422), (TooLarge("too_many_images", "m"), 413),
                (NotFound("head", "h"), 404), (Conflict("m", "model_exists"), 409),
                (Unavailable("broker_unavailable", "m"), 503),
                (Busy("queue_full", "m", retry_after_s=7), 429)]
    assert {type(e) for e, _ in refusals} == set(ServiceError.__subclasses__())
    for exc, status in refusals:
        response = _service_error(None, exc)
        body = json.loads(response.body)
        assert response.status_code == status and body["error"]["code"] == exc.code
    assert _service_error(None, refusals[-1][0]).headers["Retry-After"] == "7"
    assert json.loads(_service_error(None, NotFound("head", "h")).body)["error"] == {
        "code": "head_not_found", "message": "unknown head 'h'"}


def test_a_405_allows_every_method_of_the_path(live_api):
    """Starlette named the methods of the first route whose path matched only."""
    for method, path, allow in (("PUT", "/indexes", "GET, POST"),
                                ("POST", "/indexes/g", "DELETE, GET"),
                                ("PUT", "/embed", "POST")):
        r = httpx.request(method, live_api.url + path)
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert r.headers["allow"] == allow, (method, path)
