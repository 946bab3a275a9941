"""One error shape for every failure: {"error": {"code": ..., "message": ...}}, and the one place
that gives each refusal its HTTP status.

The wings below the API raise the service's own exceptions (`service/exceptions.py`) and the
index's (`index/faiss_index.py`); route code may raise `APIError` for what only HTTP knows (a
multipart form, a header). FastAPI's own 404/405/422 and malformed JSON are rewritten into the
same shape, so clients parse one format and never see a bare 500 for bad input.
"""

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from byorl.index import faiss_index as fi
from byorl.service.api.schemas import ErrorBody
from byorl.service.exceptions import (
    Busy,
    Conflict,
    Invalid,
    NotFound,
    ServiceError,
    TooLarge,
    Unavailable,
)

CLIENT_CLOSED_REQUEST = 499
HTTP_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")  # what the routes may take

# What each error status means, as the OpenAPI document says it.
ERROR_STATUSES = {
    400: "Malformed JSON or multipart body",
    401: "Missing or invalid X-API-Key header",
    403: "A bundled model cannot be deleted",
    404: "Unknown index, key, head, job, audit or model",
    409: "Contradicts what is stored: a name or key taken, another model, an unfinished audit",
    413: "Over a documented limit: body, images, metadata, results or response size",
    415: "Neither JSON nor multipart",
    422: "Invalid request: the message names the field",
    503: "The job queue is unreachable",
    "default": "Any other error (405, 500), in the same shape",
}


class APIError(HTTPException):
    """An HTTP error with a stable machine-readable code (an HTTPException, so that FastAPI's
    body parsing re-raises it untouched)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.code = code


def error_responses(*statuses: int | str) -> dict[int | str, dict]:
    """The `responses` of a route that can answer these error statuses (for /docs)."""
    return {s: {"model": ErrorBody, "description": ERROR_STATUSES[s]} for s in statuses}


# How /docs shows the 429 of the routes that embed images (`Encoder.embed`).
QUEUE_FULL = {429: {"model": ErrorBody,
                    "description": "The embedding queue is full (MAX_QUEUED_IMAGES): retry "
                    "after Retry-After seconds",
                    "headers": {"Retry-After": {"description": "Seconds to wait",
                                                "schema": {"type": "integer"}}}}}


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def describe_validation(errors) -> tuple[int, str, str]:
    """(status, code, message) of pydantic errors: 400 for malformed JSON, else 422."""
    errors = list(errors)
    if any(e["type"] == "json_invalid" for e in errors):
        detail = next(e for e in errors if e["type"] == "json_invalid").get("ctx", {})
        return 400, "invalid_json", f"malformed JSON body: {detail.get('error', 'invalid')}"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "validation_error", "; ".join(parts) + more


def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client hung up mid-request: no one reads an answer and no server error happened
    (499, nginx's "client closed request", in the metrics; nothing logged)."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def allowed_methods(request: Request) -> str:
    """Every method some route takes at this path: Starlette's 405 names only the first
    route whose path matched (`PUT /indexes` said `Allow: GET`, not `GET, POST`). Asked of each
    route as if the request had come with each method (routes may be included routers)."""
    def takes(method: str) -> bool:
        scope = {**request.scope, "method": method}
        return any(route.matches(scope)[0] == Match.FULL for route in request.app.routes)

    return ", ".join(m for m in HTTP_METHODS if takes(m))


def _http_error(request: Request, exc: HTTPException) -> Response:
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's "error parsing the body"
        return _client_gone(request, exc.__cause__)
    phrase = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    code = getattr(exc, "code", None) or phrase
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return error_response(exc.status_code, code, str(exc.detail), headers)


def _validation_error(request: Request, exc: RequestValidationError | ValidationError):
    return error_response(*describe_validation(exc.errors()))


# The status of each refusal below the API, by class (the first match in order wins): the
# service's own exceptions carry their code, the index's are given one here.
SERVICE_ERRORS: list[tuple[type[ServiceError], int]] = [
    (Invalid, 422), (TooLarge, 413), (NotFound, 404), (Conflict, 409), (Busy, 429),
    (Unavailable, 503),
]
INDEX_ERRORS: list[tuple[type[Exception], int, str]] = [
    (fi.UnknownKeyError, 404, "key_not_found"),
    (fi.DuplicateKeyError, 409, "duplicate_key"),
    (fi.ModelMismatchError, 409, "model_mismatch"),
    (fi.DimensionMismatchError, 422, "dimension_mismatch"),
    (fi.InvalidVectorError, 422, "invalid_vector"),
    (fi.InvalidMetadataError, 422, "invalid_metadata"),
    (fi.FilterTooLargeError, 422, "filter_too_large"),
    (fi.InvalidFilterError, 422, "invalid_filter"),
    (fi.TrainingError, 422, "index_training_failed"),
]


def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    status = next(status for cls, status in SERVICE_ERRORS if isinstance(exc, cls))
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Busy) else None
    return error_response(status, exc.code, str(exc), headers)


def _index_error(request: Request, exc: Exception) -> JSONResponse:
    for cls, status, code in INDEX_ERRORS:
        if isinstance(exc, cls):
            return error_response(status, code, str(exc))
    return _internal_error(request, exc)


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(fi.EmbeddingIndexError, _index_error)
    app.add_exception_handler(Exception, _internal_error)
