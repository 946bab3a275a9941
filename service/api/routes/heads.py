"""Linear heads fitted on the frozen encoder from a small labeled set, and their predictions."""

import numpy as np
from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from byorl.service.api.deps import Service
from byorl.service.api.errors import QUEUE_FULL, APIError, error_responses
from byorl.service.api.json_body import JsonFirstRoute
from byorl.service.api.labels import check_labels
from byorl.service.api.pagination import Page, Paging, page
from byorl.service.api.responses import ACCEPTED, job_accepted
from byorl.service.api.schemas import (
    Head,
    Images,
    JobAccepted,
    LabeledSet,
    LinearHeadRequest,
    Predictions,
)
from byorl.service.serving.encoder import Encoder

router = APIRouter(tags=["heads"], route_class=JsonFirstRoute)


async def labeled_pixels(svc: Service, body: LabeledSet) -> tuple[Encoder, np.ndarray]:
    """The model to fit on (the index's, or the named one) and the uint8 pixels of the
    submitted images, or of the given keys of an index."""
    limit = svc.settings.max_bulk_images
    if body.images is not None:
        model = svc.model(body.model)
        return model, await model.pixels(body.images, limit)
    model = svc.index_model(body.index, body.model)
    if len(body.keys) > limit:
        raise APIError(413, "too_many_images", f"{len(body.keys)} keys; the limit is {limit}")
    return model, await run_in_threadpool(svc.galleries.pixels, body.index, body.keys)


@router.post("/linear-head", status_code=202,
             responses=ACCEPTED | error_responses(400, 404, 409, 413, 422, 503))
async def create_linear_head(body: LinearHeadRequest, svc: Service,
                             response: Response) -> JobAccepted:
    """Fit a linear head (adversarially when robust) as a job. The head joins the /heads
    collection, under the job's id (`result_url`), once the job succeeded."""
    if len(body.classes) > svc.settings.max_classes:
        raise APIError(413, "too_many_classes", f"{len(body.classes)} classes; the limit is "
                       f"{svc.settings.max_classes}")
    check_labels(body.labels, len(body.classes), at_least_two=True)
    model, pixels = await labeled_pixels(svc, body)
    params = body.model_dump(exclude={"images", "labels", "keys", "model"})
    job = await svc.submit_job("linear_head", model, params, images=pixels,
                               labels=np.asarray(body.labels, np.int64))
    return job_accepted(response, job, "/heads")


@router.get("/heads", responses=error_responses(422))
def list_heads(svc: Service, paging: Paging) -> Page[Head]:
    """The fitted heads (made by POST /linear-head), oldest first."""
    return Page[Head](**page(svc.heads.list(), paging, lambda c: Head(**c)))


@router.get("/heads/{head_id}", responses=error_responses(404))
def get_head(head_id: str, svc: Service) -> Head:
    return Head(**svc.heads.card(head_id))


@router.delete("/heads/{head_id}", status_code=204, responses=error_responses(404))
def delete_head(head_id: str, svc: Service) -> Response:
    svc.heads.delete(head_id)
    return Response(status_code=204)


@router.post("/heads/{head_id}/predict",
             responses=error_responses(400, 404, 409, 413, 422) | QUEUE_FULL)
async def predict_with_head(head_id: str, body: Images, svc: Service) -> Predictions:
    """Class probabilities of images: softmax(W e(x) + b) on the head's encoder."""
    card, model = svc.head_model(head_id, body.model)
    weight, bias = svc.heads.weights(head_id)
    features = await model.embed_images(body.images, svc.settings.max_images)
    logits = features @ weight.T + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = probs.argmax(1).tolist()
    return Predictions(head_id=head_id, labels=labels, classes=[card["classes"][y] for y in labels],
                       probabilities=probs.tolist())
