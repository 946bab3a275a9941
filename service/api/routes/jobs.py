"""Jobs: submitted by /linear-head and /audits, polled at GET /jobs/{id} in either job mode."""

from fastapi import APIRouter

from byorl.service.api.deps import Service
from byorl.service.api.errors import error_responses
from byorl.service.api.pagination import Page, Paging, page
from byorl.service.api.schemas import Job

router = APIRouter(prefix="/jobs", tags=["jobs"])

@router.get("", responses=error_responses(422))
def list_jobs(svc: Service, paging: Paging) -> Page[Job]:
    """Every job, oldest first."""
    return Page[Job](**page(svc.jobs.list(), paging, lambda j: Job(**j)))


@router.get("/{job_id}", responses=error_responses(404))
def get_job(job_id: str, svc: Service) -> Job:
    """State (queued, running, succeeded, failed), progress in [0, 1], and the result."""
    return Job(**svc.jobs.get(job_id))
