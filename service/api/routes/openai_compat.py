"""The OpenAI embeddings API over the served image encoders, so that OpenAI clients and tools
(and code written for Infinity, LitServe or TEI's OpenAI routes) call this service unchanged:
`POST /v1/embeddings` with images as base64 data URLs, `GET /v1/models`. Vectors are unit length,
as OpenAI's are; `usage` counts images."""

import base64

import numpy as np
from fastapi import APIRouter

from byorl.service.api.deps import Service
from byorl.service.api.errors import QUEUE_FULL, APIError, error_responses
from byorl.service.api.json_body import JsonFirstRoute
from byorl.service.api.schemas import (
    OpenAIEmbedding,
    OpenAIEmbeddings,
    OpenAIEmbeddingsRequest,
    OpenAIModel,
    OpenAIModels,
    OpenAIUsage,
)

router = APIRouter(prefix="/v1", tags=["openai"], route_class=JsonFirstRoute)


def encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


@router.post("/embeddings", responses=error_responses(400, 404, 413, 422) | QUEUE_FULL)
async def create_embeddings(body: OpenAIEmbeddingsRequest, svc: Service) -> OpenAIEmbeddings:
    """Embed images (the OpenAI shape); `dimensions` other than the model's is refused."""
    model = svc.model(body.model)
    if body.dimensions is not None and body.dimensions != model.dim:
        raise APIError(422, "dimensions_unsupported", f"model {model.model_id!r} gives "
                       f"{model.dim}-dimensional vectors; truncation is not offered")
    images = body.input if isinstance(body.input, list) else [body.input]
    vectors = await model.embed_images(images, svc.settings.max_images)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    data = [OpenAIEmbedding(index=i, embedding=encoded(v, body.encoding_format))
            for i, v in enumerate(vectors)]
    return OpenAIEmbeddings(data=data, model=model.model_id,
                            usage=OpenAIUsage(prompt_tokens=len(images), total_tokens=len(images)))


@router.get("/models")
def list_models(svc: Service) -> OpenAIModels:
    """The served models, as OpenAI lists models (the default first)."""
    return OpenAIModels(data=[OpenAIModel(id=m.model_id, created=int(m.card.get("created_at", 0)),
                                          owned_by="user" if not m.bundled else "byorl")
                              for m in svc.models])
