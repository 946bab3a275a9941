"""Probes, metrics and the model card: open without an API key (orchestrators call them)."""

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from byorl import model_dir
from byorl.service.api.deps import Service
from byorl.service.api.schemas import Health
from byorl.service.metrics import REGISTRY

router = APIRouter(tags=["health"])


@router.get("/healthz")
def check_health() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Health}})
async def check_readiness(svc: Service, response: Response) -> Health:
    """Ready to serve: the bundled models embed an image now (each probed at most every
    READY_PROBE_S), the galleries are open and the broker answers when one is configured.
    Users' models are probed too and reported (`inference:<id>`), but a broken one does not
    take the service out of rotation."""
    probes = [(m.model_id, m.bundled, await m.probe()) for m in svc.models]
    checks = {"model": len(svc.models) > 0, "indexes": svc.galleries is not None,
              "broker": await run_in_threadpool(svc.queue.ping),
              **{f"inference:{model_id}": ok for model_id, _, ok in probes}}
    ready = checks["model"] and checks["indexes"] and checks["broker"] and all(
        ok for _, bundled, ok in probes if bundled)
    response.status_code = 200 if ready else 503
    device = model_dir.session_device(svc.models.default.session) if len(svc.models) else None
    return Health(status="ready" if ready else "not ready", checks=checks, device=device)


@router.get("/metrics", response_class=Response)
def get_metrics() -> Response:
    """Prometheus metrics: requests, latencies, batch sizes, queue depths (a thread: the job
    queue depth may ask Redis)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
