"""Jobs: submitted by /linear-head and /audits, polled at GET /jobs/{id} in either job mode."""

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from service.deps import AppState, Service
from service.errors import APIError, error_responses
from service.schemas import Job, JobAccepted

router = APIRouter(prefix="/jobs", tags=["jobs"])


async def submit_job(svc: AppState, kind: str, params: dict, **arrays) -> JobAccepted:
    """Record the job and its inputs in the data directory, then queue its id."""
    job = await run_in_threadpool(svc.jobs.create, kind, {**params, "model_id": svc.model_id},
                                  **arrays)
    try:
        await run_in_threadpool(svc.queue.submit, job["id"])
    except Exception as exc:
        svc.jobs.update(job["id"], state="failed", stage="failed", error="could not be queued")
        raise APIError(503, "broker_unavailable", f"the job queue is unreachable: {exc}") from None
    return JobAccepted(job_id=job["id"], kind=kind, state=job["state"],
                       status_url=f"/jobs/{job['id']}")


@router.get("")
def list_jobs(svc: Service) -> list[Job]:
    return [Job(**j) for j in svc.jobs.list()]


@router.get("/{job_id}", responses=error_responses(404))
def get_job(job_id: str, svc: Service) -> Job:
    """State (queued, running, succeeded, failed), progress in [0, 1], and the result."""
    return Job(**svc.jobs.get(job_id))
