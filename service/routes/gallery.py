"""Galleries: named indexes of embedded images under user keys, with JSON metadata."""

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool

from index.faiss_index import EmbeddingIndex
from service.deps import AppState, Service
from service.errors import APIError
from service.schemas import IndexCreate, IndexInfo, Item, ItemsAdd, ItemsAdded, ItemsPage, Removed

router = APIRouter(prefix="/indexes", tags=["gallery"])


def index_info(svc: AppState, name: str, index: EmbeddingIndex | None = None) -> IndexInfo:
    index = svc.gallery.get(name) if index is None else index
    return IndexInfo(name=name, model_id=index.model_id, dim=index.dim, factory=index.factory,
                     count=len(index))


def check_model(svc: AppState, name: str) -> None:
    """An index holds vectors of one model: the served one must be it to add or query images."""
    index = svc.gallery.get(name)
    if index.model_id != svc.model_id:
        raise APIError(409, "model_mismatch", f"index {name!r} holds embeddings of model "
                       f"{index.model_id!r}; the service runs {svc.model_id!r}")


@router.get("")
def list_indexes(svc: Service) -> list[IndexInfo]:
    return [index_info(svc, name, index) for name, index in svc.gallery.indexes()]


@router.post("", status_code=201)
def create_index(body: IndexCreate, svc: Service) -> IndexInfo:
    """An empty index for embeddings of the served model."""
    try:
        svc.gallery.create(body.name, svc.card["embedding_dim"], svc.model_id, body.factory)
    except ValueError as exc:
        if "factory" not in str(exc):
            raise
        raise APIError(422, "invalid_factory", str(exc)) from None
    return index_info(svc, body.name)


@router.get("/{name}")
def get_index(name: str, svc: Service) -> IndexInfo:
    return index_info(svc, name)


@router.delete("/{name}", status_code=204)
def delete_index(name: str, svc: Service) -> Response:
    svc.gallery.delete(name)
    return Response(status_code=204)


@router.post("/{name}/items", status_code=201)
async def add_items(name: str, body: ItemsAdd, svc: Service) -> ItemsAdded:
    """Embed images and store them under new keys (an existing key is a 409)."""
    check_model(svc, name)
    pixels = await svc.decode_base64(body.images, svc.settings.max_bulk_images)
    vectors = await svc.embed(pixels)
    await run_in_threadpool(svc.gallery.add, name, body.keys, vectors, pixels, body.metadata,
                            svc.model_id)
    return ItemsAdded(index=name, added=len(body.keys), count=len(svc.gallery.get(name)))


@router.get("/{name}/items")
def list_items(
    name: str, svc: Service,
    offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ItemsPage:
    count, page = svc.gallery.get(name).page(offset, limit)  # one instant: removals race it
    items = [Item(key=k, metadata=m) for k, m in page]
    return ItemsPage(index=name, count=count, offset=offset, items=items)


@router.delete("/{name}/items/{key:path}")
def remove_item(name: str, key: str, svc: Service) -> Removed:
    removed = svc.gallery.remove(name, [key])
    return Removed(index=name, removed=removed, count=len(svc.gallery.get(name)))
