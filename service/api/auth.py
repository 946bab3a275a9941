"""The API key, checked as pure ASGI middleware before the app reads a byte of the request: a
client without the key gets 401 whatever its body holds (malformed JSON included), and costs
no parsing. Probes, metrics and docs stay open (orchestrators call them keyless).

The OpenAPI document declares the key only when one is configured, and then on exactly the
routes that need it.
"""

import hmac
from collections.abc import Callable

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from byorl.service.api.errors import ERROR_STATUSES, error_response

HEADER = "X-API-Key"
SCHEME = "ApiKey"


def open_paths(app: FastAPI, routers) -> frozenset[str]:
    """Paths served without a key: the given routers' (probes, metrics) and the docs."""
    docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
    return frozenset([r.path for router in routers for r in router.routes]
                     + [p for p in docs if p])


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key a request presents: its X-API-Key header, else `Authorization: Bearer KEY`
    (what OpenAI clients send)."""
    if (key := headers.get(HEADER.lower().encode())) is not None:
        return key
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, key: str, open_paths: frozenset[str]):
        self.app, self.key, self.open_paths = app, key.encode(), open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = presented_key(dict(scope["headers"]))
            if given is None or not hmac.compare_digest(given, self.key):
                response = error_response(401, "unauthorized",
                                          f"missing or invalid {HEADER} header (or "
                                          "Authorization: Bearer)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def declare_api_key(app: FastAPI, open_paths: frozenset[str]) -> None:
    """Make the generated OpenAPI document require the key on every route that checks it."""
    generate: Callable[[], dict] = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = {
                SCHEME: {"type": "apiKey", "in": "header", "name": HEADER}}
            for path, operations in schema["paths"].items():
                if path in open_paths:
                    continue
                for op in operations.values():
                    op["security"] = [{SCHEME: []}]
                    op["responses"]["401"] = {
                        "description": ERROR_STATUSES[401],
                        "content": {"application/json": {"schema": {
                            "$ref": "#/components/schemas/ErrorBody"}}}}
        return app.openapi_schema

    app.openapi = openapi
