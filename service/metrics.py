"""Prometheus metrics of the api process, in a registry of their own (exposed at /metrics)."""

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

disable_created_metrics()  # no *_created series: scrape output stays readable
REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "byorl_requests", "HTTP requests by route and status.", ["method", "route", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "byorl_request_seconds", "HTTP request latency by route.", ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "byorl_batch_images", "Images per ONNX Runtime call of the dynamic batcher.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY,
)
BATCH_QUEUE = Gauge(
    "byorl_batch_queue_images", "Images waiting for the dynamic batcher.", registry=REGISTRY
)
JOB_QUEUE = Gauge(
    "byorl_job_queue_depth", "Jobs submitted and not yet started.", registry=REGISTRY
)


class MetricsMiddleware:
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
