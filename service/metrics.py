"""Prometheus metrics of the api process, in a registry of their own (exposed at /metrics):
requests (counted by the api's `MetricsMiddleware`), the dynamic batcher, the job queue."""

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

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
