"""POST /embed: images (base64 in JSON, or multipart uploads) -> embeddings, unit-length unless
`normalize` is false (as in Text Embeddings Inference)."""

import numpy as np
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from byorl.service.api.deps import Service
from byorl.service.api.errors import QUEUE_FULL, APIError, error_responses
from byorl.service.api.schemas import Embeddings, EmbedRequest

router = APIRouter(tags=["embeddings"])

BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": EmbedRequest.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "normalize": {"type": "boolean", "default": True},
                    "model": {"type": "string", "description": "A served model's id"},
                },
                "required": ["files"],
            }
        },
    },
}


def form_flag(value: object, name: str, default: bool) -> bool:
    """A multipart boolean field: true/false/1/0 (absent: the default)."""
    if value is None:
        return default
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise APIError(422, "validation_error", f"{name}: expected true or false, not {text!r}")
    return text in ("true", "1")


async def read_embed_request(request: Request, limit: int
                             ) -> tuple[list[bytes] | list[str], bool, str | None]:
    """(images, normalize, model) of a JSON body ({"images": [base64, ...], "normalize":
    bool, "model": id}) or of a multipart form (`files`, optional fields `normalize`, `model`)."""
    content_type = request.headers.get("content-type", "application/json")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=limit, max_fields=16)
        except APIError:  # the body limit, found while the form streamed: keep its 413
            raise
        except HTTPException as exc:
            if str(exc.detail).startswith("Too many files"):
                raise APIError(413, "too_many_images",
                               f"more than {limit} images in one request") from None
            raise APIError(400, "invalid_multipart", str(exc.detail)) from None
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        normalize = form_flag(form.get("normalize"), "normalize", default=True)
        model = form.get("model")
        return [await f.read() for f in files], normalize, None if model is None else str(model)
    if content_type.startswith("application/json"):
        body = EmbedRequest.model_validate_json(await request.body())
        return body.images, body.normalize, body.model
    raise APIError(415, "unsupported_media_type",
                   f"send application/json or multipart/form-data, not {content_type}")


@router.post("/embed", openapi_extra={"requestBody": BODY},
             responses=error_responses(400, 404, 413, 415, 422) | QUEUE_FULL)
async def embed_images(request: Request, svc: Service) -> Embeddings:
    """Embed a batch of images; concurrent requests share one ONNX Runtime call."""
    limit = svc.settings.max_images
    images, normalize, name = await read_embed_request(request, limit)
    model = svc.model(name)
    vectors = await model.embed_images(images, limit)
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return Embeddings(model_id=model.model_id, dim=vectors.shape[1], normalized=normalize,
                      embeddings=vectors.tolist())
