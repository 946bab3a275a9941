"""Adversarial audits as jobs: robust accuracy of encoder + head, or the retrieval audit."""

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Body, Response

from byorl.service.api.deps import Service
from byorl.service.api.errors import APIError, error_responses
from byorl.service.api.json_body import JsonFirstRoute
from byorl.service.api.labels import check_labels
from byorl.service.api.pagination import Page, Paging, page
from byorl.service.api.responses import ACCEPTED, job_accepted
from byorl.service.api.schemas import AuditRequest, Job, JobAccepted, RobustnessAudit
from byorl.service.exceptions import NotFound

router = APIRouter(prefix="/audits", tags=["audits"], route_class=JsonFirstRoute)


@router.post("", status_code=202,
             responses=ACCEPTED | error_responses(400, 404, 409, 413, 422, 503))
async def create_audit(body: Annotated[AuditRequest, Body()], svc: Service,
                       response: Response) -> JobAccepted:
    """Start an audit; its report is at GET /audits/{id} once the job succeeded."""
    arrays = {}
    if isinstance(body, RobustnessAudit):
        card, model = svc.head_model(body.head_id, body.model)
        check_labels(body.labels, len(card["classes"]), at_least_two=False)
        arrays["labels"] = np.asarray(body.labels, np.int64)
    else:
        model = svc.index_model(body.index, body.model)
        if not len(svc.galleries.get(body.index)):
            raise APIError(422, "empty_index", f"index {body.index!r} holds no items to retrieve")
    arrays["images"] = await model.pixels(body.images, svc.settings.max_bulk_images)
    params = {**body.model_dump(exclude={"images", "labels", "kind", "model"}),
              "audit": body.kind}
    return job_accepted(response, await svc.submit_job("audit", model, params, **arrays), "/audits")


@router.get("", responses=error_responses(422))
def list_audits(svc: Service, paging: Paging) -> Page[Job]:
    """The audits' jobs, oldest first (each report is at GET /audits/{id})."""
    audits = [j for j in svc.jobs.list() if j["kind"] == "audit"]
    return Page[Job](**page(audits, paging, lambda j: Job(**j)))


@router.get("/{audit_id}", responses=error_responses(404, 409))
def get_audit_report(audit_id: str, svc: Service) -> dict:
    """The stored report; 409 while the audit's job has not succeeded."""
    try:
        return svc.reports.get(audit_id)
    except NotFound:
        try:
            job = svc.jobs.get(audit_id)
        except NotFound:
            job = None
        if job is None or job["kind"] != "audit":
            raise
        raise APIError(409, "audit_not_finished", f"audit {audit_id!r} is {job['state']}: "
                       f"see /jobs/{audit_id}") from None
