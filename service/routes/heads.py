"""Linear heads fitted on the frozen encoder from a small labeled set, and their predictions."""

import numpy as np
from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from byorl.service.deps import QUEUE_FULL, AppState, Service
from byorl.service.errors import APIError, error_responses
from byorl.service.pagination import Page, Paging, page
from byorl.service.routes.gallery import check_model
from byorl.service.routes.jobs import ACCEPTED, submit_job
from byorl.service.schemas import (
    Head,
    Images,
    JobAccepted,
    LabeledSet,
    LinearHeadRequest,
    Predictions,
)
from byorl.service.served_models import ServedModel

router = APIRouter(tags=["heads"])


def check_labels(labels: list[int], num_classes: int, at_least_two: bool) -> None:
    bad = sorted({y for y in labels if not 0 <= y < num_classes})
    if bad:
        raise APIError(422, "label_out_of_range",
                       f"labels {bad[:5]} are outside [0, {num_classes}) for {num_classes} classes")
    if at_least_two and len(set(labels)) < 2:
        raise APIError(422, "single_class", "the labeled set holds a single class; a classifier "
                       "needs examples of at least two")


async def labeled_pixels(svc: AppState, body: LabeledSet) -> tuple[ServedModel, np.ndarray]:
    """The model to fit on (the index's, or the named one) and the uint8 pixels of the
    submitted images, or of the given keys of an index."""
    limit = svc.settings.max_bulk_images
    if body.images is not None:
        model = svc.model(body.model)
        return model, await model.decode_base64(body.images, limit)
    model = check_model(svc, body.index, body.model)
    if len(body.keys) > limit:
        raise APIError(413, "too_many_images", f"{len(body.keys)} keys; the limit is {limit}")
    return model, await run_in_threadpool(svc.gallery.pixels, body.index, body.keys)


def head_of_served_model(svc: AppState, head_id: str, asked: str | None = None
                         ) -> tuple[dict, ServedModel]:
    """A head's card and the model it was fitted on (409 when not served, or not `asked`)."""
    card = svc.heads.card(head_id)
    return card, svc.model_of(card["model_id"], asked, f"head {head_id!r}")


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
    return await submit_job(svc, response, "linear_head", "/heads", model, params, images=pixels,
                            labels=np.asarray(body.labels, np.int64))


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
    card, model = head_of_served_model(svc, head_id, body.model)
    weight, bias = svc.heads.weights(head_id)
    features = await model.embed(await model.decode_base64(body.images, svc.settings.max_images))
    logits = features @ weight.T + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = probs.argmax(1).tolist()
    return Predictions(head_id=head_id, labels=labels, classes=[card["classes"][y] for y in labels],
                       probabilities=probs.tolist())
