"""POST /search: images or embeddings -> the k most similar items of an index."""

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from byorl.index.faiss_index import parse_filter
from byorl.service.api.deps import Service
from byorl.service.api.errors import QUEUE_FULL, APIError, error_responses
from byorl.service.api.json_body import JsonFirstRoute
from byorl.service.api.responses import search_response
from byorl.service.api.schemas import SearchRequest, SearchResults

router = APIRouter(tags=["galleries"], route_class=JsonFirstRoute)


@router.post("/search", response_model=SearchResults,
             responses=error_responses(400, 404, 409, 413, 422) | QUEUE_FULL)
async def search_index(body: SearchRequest, svc: Service) -> Response:
    """Top-k keys by cosine similarity, with their metadata, one list per query; with a
    `filter`, the top k of the items whose metadata matches it."""
    index = svc.galleries.get(body.index)
    limit, asked = svc.settings.max_search_results, len(body.images or body.embeddings) * body.k
    if asked > limit:
        raise APIError(413, "too_many_results", f"queries x k = {asked}; the limit is {limit}")
    parse_filter(body.filter, max_fields=svc.settings.max_filter_fields,
                 max_values=svc.settings.max_filter_values)  # before any image is embedded
    if body.images is not None:
        model = svc.index_model(body.index, body.model)
        queries = await model.embed_images(body.images, svc.settings.max_images)
    else:
        if body.model is not None:
            svc.index_model(body.index, body.model)
        queries = body.embeddings
        if len(queries) > svc.settings.max_images:
            raise APIError(413, "too_many_queries", f"{len(queries)} embeddings in one request; "
                           f"the limit is {svc.settings.max_images}")
        if any(len(q) != index.dim for q in queries):
            bad = next(len(q) for q in queries if len(q) != index.dim)
            raise APIError(422, "dimension_mismatch", f"index {body.index!r} holds embeddings of "
                           f"dimension {index.dim}, got one of dimension {bad}")
    hits = await run_in_threadpool(svc.galleries.search, body.index, queries, body.k,
                                   raw_metadata=True, filter=body.filter, nprobe=body.nprobe,
                                   ef_search=body.ef, consistency=body.consistency)
    return search_response(body.index, index.model_id, hits, svc.settings.max_response_bytes)
