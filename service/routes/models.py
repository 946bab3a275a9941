"""GET /models: the card of the served encoder."""

from fastapi import APIRouter

from service.deps import Service

router = APIRouter(tags=["models"])


@router.get("/models")
def list_models(svc: Service) -> list[dict]:
    """Model cards (architecture, threat model, embedding size, metrics, sha256)."""
    return [svc.card]
