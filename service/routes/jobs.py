"""Jobs: submitted by /linear-head and /audits, polled at GET /jobs/{id} in either job mode."""

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from byorl.service.deps import AppState, Service
from byorl.service.errors import APIError, error_responses
from byorl.service.pagination import Page, Paging, page
from byorl.service.schemas import Job, JobAccepted
from byorl.service.served_models import ServedModel

router = APIRouter(prefix="/jobs", tags=["jobs"])

# How /docs shows the 202 of the routes that submit jobs.
ACCEPTED = {202: {"description": "Queued: poll the job at Location; its product will be at "
                  "result_url once the job succeeded",
                  "headers": {"Location": {"description": "The job: /jobs/{id}",
                                           "schema": {"type": "string"}}}}}


async def submit_job(svc: AppState, response: Response, kind: str, result_collection: str,
                     model: ServedModel, params: dict, **arrays) -> JobAccepted:
    """Record the job (for `model`) and its inputs in the data directory, then queue its id;
    the answer (202) points at the job (Location) and at where its product will be (in
    `result_collection`)."""
    job = await run_in_threadpool(svc.jobs.create, kind, {**params, "model_id": model.model_id},
                                  **arrays)
    try:
        await run_in_threadpool(svc.queue.submit, job["id"])
    except Exception as exc:
        svc.jobs.update(job["id"], state="failed", stage="failed", error="could not be queued")
        raise APIError(503, "broker_unavailable", f"the job queue is unreachable: {exc}") from None
    response.headers["Location"] = f"/jobs/{job['id']}"
    return JobAccepted(job_id=job["id"], kind=kind, state=job["state"],
                       status_url=response.headers["Location"],
                       result_url=f"{result_collection}/{job['id']}")


@router.get("", responses=error_responses(422))
def list_jobs(svc: Service, paging: Paging) -> Page[Job]:
    """Every job, oldest first."""
    return Page[Job](**page(svc.jobs.list(), paging, lambda j: Job(**j)))


@router.get("/{job_id}", responses=error_responses(404))
def get_job(job_id: str, svc: Service) -> Job:
    """State (queued, running, succeeded, failed), progress in [0, 1], and the result."""
    return Job(**svc.jobs.get(job_id))
