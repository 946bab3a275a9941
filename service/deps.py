"""What route handlers receive: the loaded service."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from byorl.service.errors import APIError
from byorl.service.gallery import Gallery
from byorl.service.jobs import CeleryQueue, EmbeddedQueue
from byorl.service.schemas import ErrorBody
from byorl.service.served_models import ModelRegistry, ServedModel
from byorl.service.settings import Settings
from byorl.service.store import HeadStore, JobStore, ReportStore

# How /docs shows the 429 of the routes that embed images (`ServedModel.embed`).
QUEUE_FULL = {429: {"model": ErrorBody,
                    "description": "The embedding queue is full (MAX_QUEUED_IMAGES): retry "
                    "after Retry-After seconds",
                    "headers": {"Retry-After": {"description": "Seconds to wait",
                                                "schema": {"type": "integer"}}}}}


@dataclass
class AppState:
    """Everything loaded once by the lifespan handler and shared by all requests."""

    settings: Settings
    models: ModelRegistry
    gallery: Gallery
    jobs: JobStore
    heads: HeadStore
    reports: ReportStore
    queue: CeleryQueue | EmbeddedQueue

    def model(self, name: str | None) -> ServedModel:
        """The model a request names (`model`), or the default one."""
        return self.models.get(name)

    def model_of(self, model_id: str, asked: str | None, what: str) -> ServedModel:
        """The model that a stored thing (an index, a head) is tied to: 409 when the request
        names another model, or when the service no longer serves it."""
        if asked is not None and asked != model_id:
            raise APIError(409, "model_mismatch", f"{what} belongs to model {model_id!r}, "
                           f"not {asked!r}")
        if model_id not in self.models:
            raise APIError(409, "model_mismatch", f"{what} belongs to model {model_id!r}, "
                           "which this service does not serve")
        return self.models.get(model_id)


def get_state(request: Request) -> AppState:
    return request.app.state.byorl


Service = Annotated[AppState, Depends(get_state)]
