"""Galleries: named indexes of embedded images under user keys, with JSON metadata."""

import base64
import binascii
import io
import json
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from byorl.service.api.deps import Service
from byorl.service.api.errors import QUEUE_FULL, APIError, error_responses
from byorl.service.api.json_body import JsonFirstRoute
from byorl.service.api.pagination import Page, Paging, page, page_of
from byorl.service.api.responses import export_response, items_response
from byorl.service.api.schemas import (
    ExportPage,
    GalleryCreate,
    GalleryInfo,
    ItemsAdd,
    ItemsAdded,
    ItemsPage,
    Removed,
    VectorsAdd,
)
from byorl.service.exceptions import Invalid
from byorl.service.storage.galleries import check_factory

router = APIRouter(prefix="/indexes", tags=["galleries"], route_class=JsonFirstRoute)


def gallery_info(svc: Service, name: str, index: Any = None) -> GalleryInfo:
    """`index`: what the galleries' `get` returns (an EmbeddingIndex or a MilvusGallery)."""
    index = svc.galleries.get(name) if index is None else index
    return GalleryInfo(name=name, model_id=index.model_id, dim=index.dim, factory=index.factory,
                     count=len(index))


def check_metadata(metadata: list[Any] | None, limit: int) -> None:
    """Each item's metadata within the limit, measured as the JSON text the index stores (and
    every search that finds the item returns)."""
    for i, value in enumerate(metadata or []):
        try:
            size = len(json.dumps(value, allow_nan=False))
        except ValueError:
            raise APIError(422, "invalid_metadata", f"metadata[{i}] holds NaN or infinity, "
                           "which JSON cannot") from None
        if size > limit:
            raise APIError(413, "metadata_too_large", f"metadata[{i}] is {size} bytes as JSON; "
                           f"the limit is {limit} bytes per item")


@router.get("", responses=error_responses(422))
def list_indexes(svc: Service, paging: Paging) -> Page[GalleryInfo]:
    """The indexes by name, each read once (a concurrent delete never makes the listing 404)."""
    return Page[GalleryInfo](**page(svc.galleries.indexes(), paging,
                                  lambda pair: gallery_info(svc, *pair)))


@router.post("", status_code=201, responses=error_responses(400, 409, 413, 422))
def create_index(body: GalleryCreate, svc: Service) -> GalleryInfo:
    """An empty index for embeddings of the named model (default: the first served)."""
    model = svc.model(body.model)
    if not svc.settings.milvus_uri:  # Milvus galleries check theirs (milvus_galleries.py)
        check_factory(body.factory or "Flat", svc.settings)
    try:
        svc.galleries.create(body.name, model.dim, model.model_id, body.factory)
    except ValueError as exc:
        if "factory" not in str(exc):
            raise
        raise APIError(422, "invalid_factory", str(exc)) from None
    return gallery_info(svc, body.name)


@router.get("/{name}", responses=error_responses(404))
def get_index(name: str, svc: Service) -> GalleryInfo:
    return gallery_info(svc, name)


@router.delete("/{name}", status_code=204, responses=error_responses(404))
def delete_index(name: str, svc: Service) -> Response:
    svc.galleries.delete(name)
    return Response(status_code=204)


@router.post("/{name}/items", status_code=201,
             responses=error_responses(400, 404, 409, 413, 422) | QUEUE_FULL)
async def add_items(name: str, body: ItemsAdd, svc: Service) -> ItemsAdded:
    """Embed images and store them under new keys (an existing key is a 409)."""
    model = svc.index_model(name, body.model)
    check_metadata(body.metadata, svc.settings.max_metadata_bytes)
    pixels = await model.pixels(body.images, svc.settings.max_bulk_images)
    vectors = await model.embed(pixels)
    await run_in_threadpool(svc.galleries.add, name, body.keys, vectors, pixels, body.metadata,
                            model.model_id)
    return ItemsAdded(index=name, added=len(body.keys), count=len(svc.galleries.get(name)))


@router.get("/{name}/items", response_model=ItemsPage,
            responses=error_responses(404, 413, 422))
def list_items(name: str, svc: Service, paging: Paging) -> Response:
    index = svc.galleries.get(name)
    # one instant (removals race it); metadata as stored JSON text, never decoded
    count, items = index.page(paging.offset, paging.limit, raw_metadata=True)
    return items_response(name, page_of(items, count, paging), svc.settings.max_response_bytes)


@router.get("/{name}/pixels/{key:path}", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "The item's pixels"}}
            | error_responses(404))
def get_item_pixels(name: str, key: str, svc: Service) -> Response:
    """The pixels an item was embedded from (the model's input size) as a PNG: thumbnails."""
    pixels = svc.galleries.pixels(name, [key])[0]
    buf = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=60"})


@router.delete("/{name}/items/{key:path}", responses=error_responses(404))
def remove_item(name: str, key: str, svc: Service) -> Removed:
    removed = svc.galleries.remove(name, [key])
    return Removed(index=name, removed=removed, count=len(svc.galleries.get(name)))


def decode_field(body: VectorsAdd, name: str) -> bytes:
    try:
        return base64.b64decode(getattr(body, name), validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("invalid_base64", f"{name} is not valid base64") from None


@router.get("/{name}/export", response_model=ExportPage,
            responses=error_responses(404, 413, 422))
def export_items(name: str, svc: Service, paging: Paging) -> Response:
    """A page of items (insertion order) with their stored vectors and pixels, for a backup or
    a move (`byorl gallery export`): fewer than `limit` when more would pass the response
    limit. Pages are consistent while the gallery is not written to."""
    index = svc.galleries.get(name)
    # raw bytes at most half the limit: base64 adds a third, JSON escapes the keys
    page = svc.galleries.export_page(name, paging.offset, paging.limit,
                                     svc.settings.max_response_bytes // 2)
    shown = page_of(list(zip(page.keys, page.metadata, strict=True)), page.count, paging)
    fields = {"model_id": index.model_id, "onnx_sha256": svc.card_hash(index.model_id),
              "dim": index.dim, "factory": index.factory}
    return export_response(name, fields, shown, page, svc.settings.max_response_bytes)


@router.post("/{name}/vectors", status_code=201, responses=error_responses(400, 404, 409, 413,
                                                                           422))
def add_vectors(name: str, body: VectorsAdd, svc: Service) -> ItemsAdded:
    """Store items from the vectors and pixels of an export (`byorl gallery restore`), without
    embedding: only into a gallery of the same model, served from the same file (409
    `model_mismatch` / `model_hash_mismatch`); an existing key is a 409, as for images."""
    model = svc.restore_model(name, body.model_id, body.onnx_sha256)
    check_metadata(body.metadata, svc.settings.max_metadata_bytes)
    svc.galleries.add_vectors(name, body.keys, decode_field(body, "vectors"),
                              decode_field(body, "pixels"), body.metadata, model.model_id,
                              (3, model.input_size, model.input_size),
                              svc.settings.max_bulk_images)
    return ItemsAdded(index=name, added=len(body.keys), count=len(svc.galleries.get(name)))
