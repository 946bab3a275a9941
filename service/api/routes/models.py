"""The served models: their cards, registering a user's ONNX encoder, deleting it."""

import json

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from byorl.service.api.deps import Service
from byorl.service.api.errors import APIError, error_responses
from byorl.service.api.schemas import UploadedModelCard
from byorl.service.exceptions import NotFound
from byorl.service.serving.model_upload import register_model

UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "The .onnx encoder"},
            "card": {"type": "string", "description": "JSON: UploadedModelCard"},
        },
        "required": ["file", "card"],
    }}},
}


router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(svc: Service) -> list[dict]:
    """Model cards (architecture, threat model, embedding size, metrics, sha256), the default
    model first; `source` says bundled or user, `default` which one requests get by default.
    Stored user models that failed to load come last, with `available: false` and the error."""
    default = svc.models.default.model_id
    served = [m.describe(m.model_id == default) for m in svc.models]
    return served + list(svc.models.unavailable.values())


@router.get("/{model_id}", responses=error_responses(404))
def get_model(model_id: str, svc: Service) -> dict:
    model = svc.model(model_id)
    return model.describe(model.model_id == svc.models.default.model_id)


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, UploadedModelCard]:
    """The ONNX file (`file`) and the card (`card`, JSON text) of a multipart upload."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(415, "unsupported_media_type", "send multipart/form-data with a `file` "
                       "(the .onnx) and a `card` (JSON)")
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
    except APIError:  # the body limit, found while the form streamed: keep its 413
        raise
    except HTTPException as exc:
        raise APIError(400, "invalid_multipart", str(exc.detail)) from None
    upload, card = form.get("file"), form.get("card")
    if not isinstance(upload, UploadFile):
        raise APIError(422, "validation_error", "file: the ONNX encoder is missing")
    if not isinstance(card, str):
        raise APIError(422, "validation_error", "card: a JSON object (name, input_size, "
                       "threat_model) is missing")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(413, "model_too_large", f"the ONNX file exceeds MAX_MODEL_BYTES "
                       f"({max_bytes} bytes)")
    try:
        return data, UploadedModelCard.model_validate(json.loads(card))
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise APIError(422, "invalid_card", f"card: not JSON ({exc})") from None
        raise


@router.post("", status_code=201, openapi_extra={"requestBody": UPLOAD_BODY},
             responses=error_responses(400, 409, 413, 415, 422))
async def create_model(request: Request, svc: Service) -> dict:
    """Register an ONNX encoder (float32 NCHW pixels in [0, 1], normalisation inside, a fixed
    square input size, one vector per image): validated, stored in the data directory and the
    model registry, served at once (by every replica, see MODEL_REFRESH_S) and after restarts."""
    s = svc.settings
    if await run_in_threadpool(svc.models.user_count) >= s.max_user_models:
        raise APIError(413, "too_many_models", f"{s.max_user_models} user models are "
                       "registered (MAX_USER_MODELS): delete one first")
    data, card = await read_upload(request, s.max_model_bytes)
    model = await run_in_threadpool(register_model, data, card.model_dump(), s, svc.models)
    return svc.models.add(model).describe(default=False)


@router.delete("/{model_id}", status_code=204, responses=error_responses(403, 404, 409))
async def delete_model(model_id: str, svc: Service) -> Response:
    """Delete a user model (an unavailable one too), for every replica (within
    MODEL_REFRESH_S); 409 while an index or a head uses it, 403 for a bundled one."""
    if model_id in svc.models.bundled_ids():
        raise APIError(403, "bundled_model", f"model {model_id!r} is bundled with the service "
                       "(MODEL_DIRS); only user models can be deleted")
    if model_id not in svc.models.unavailable:
        if await run_in_threadpool(svc.models.store.get, model_id) is None:
            raise NotFound("model", model_id)
        users = [f"index {name!r}" for name, index in svc.galleries.indexes()
                 if index.model_id == model_id]
        users += [f"head {c['id']!r}" for c in svc.heads.list() if c["model_id"] == model_id]
        if users:
            raise APIError(409, "model_in_use", f"model {model_id!r} is used by "
                           f"{', '.join(users[:5])}{' and more' if len(users) > 5 else ''}: "
                           "delete them first")
    await svc.models.remove(model_id)
    return Response(status_code=204)
