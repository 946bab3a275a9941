"""POST /embed: images (base64 in JSON, or multipart uploads) -> embeddings."""

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.deps import Service
from service.errors import APIError, error_responses
from service.images import decode_base64
from service.schemas import Embeddings, Images

router = APIRouter(tags=["embeddings"])

BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": Images.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"files": {"type": "array", "items": {"type": "string",
                                                                    "format": "binary"}}},
                "required": ["files"],
            }
        },
    },
}


async def read_image_bytes(request: Request, limit: int) -> list[bytes]:
    """The image bytes of a JSON body ({"images": [base64, ...]}) or of multipart `files`."""
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
        return [await f.read() for f in files]
    if content_type.startswith("application/json"):
        body = Images.model_validate_json(await request.body())
        return [decode_base64(s, i) for i, s in enumerate(body.images)]
    raise APIError(415, "unsupported_media_type",
                   f"send application/json or multipart/form-data, not {content_type}")


@router.post("/embed", openapi_extra={"requestBody": BODY},
             responses=error_responses(400, 413, 415, 422))
async def embed_images(request: Request, svc: Service) -> Embeddings:
    """Embed a batch of images; concurrent requests share one ONNX Runtime call."""
    limit = svc.settings.max_images
    pixels = await svc.decode(await read_image_bytes(request, limit), limit)
    vectors = await svc.embed(pixels)
    return Embeddings(model_id=svc.model_id, dim=vectors.shape[1], embeddings=vectors.tolist())
