"""Pure ASGI middleware: the request body limit, answering in the API's JSON error shape, and
the request metrics.

The body limit: a declared Content-Length over the limit is refused before the app runs or a
byte is read; a chunked (or lying) body is counted as it streams and refused the moment it
crosses the limit.
(FastAPI's own `max_body_size` answers a declared oversize body in plain text, whatever the
app's error handlers say.)
"""

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from byorl.service.api.errors import APIError, error_response
from byorl.service.metrics import LATENCY, REQUESTS


class BodyLimitMiddleware:
    """`max_bytes` per request body; `path_limits` give some paths their own (model uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None):
        self.app, self.max_bytes, self.path_limits = app, max_bytes, path_limits or {}

    def _too_large(self, limit: int) -> APIError:
        return APIError(413, "payload_too_large",
                        f"request body exceeds the limit of {limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        seen, started = 0, False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(limit)  # an HTTPException: the app's handlers answer it
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except APIError as exc:  # raised where no handler caught it (e.g. in a middleware)
            if started or exc.code != "payload_too_large":
                raise
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        exc = self._too_large(limit)
        response = error_response(exc.status_code, exc.code, exc.detail, {"Connection": "close"})
        await response(scope, receive, send)


class MetricsMiddleware:
    """Counts every request by method, route template and status, and times it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # The matched route's path template keeps label values bounded.
            route, method = getattr(scope.get("route"), "path", "unmatched"), scope["method"]
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - start)
