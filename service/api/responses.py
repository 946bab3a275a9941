"""Answers built by hand: those that grow with what clients stored and asked for (search hits,
pages of items), and the 202 of a submitted job.

The growing ones are written as JSON text around each item's metadata as the index stores
it (JSON text, never decoded into Python objects) and refused with a 413 the moment they would
pass the response limit, so memory stays within that limit whatever a gallery holds: one item
with 30 MiB of metadata found by 256 queries x k=1000 once took the api to 23 GB.
"""

import base64
import json
from collections.abc import Iterable

from fastapi import Response

from byorl.service.api.errors import APIError
from byorl.service.api.schemas import JobAccepted

# How /docs shows the 202 of the routes that submit jobs.
ACCEPTED = {202: {"description": "Queued: poll the job at Location; its product will be at "
                  "result_url once the job succeeded",
                  "headers": {"Location": {"description": "The job: /jobs/{id}",
                                           "schema": {"type": "string"}}}}}


def job_accepted(response: Response, job: dict, result_collection: str) -> JobAccepted:
    """The 202 answer of a submitted job: it points at the job (Location) and at where its
    product will be (in `result_collection`)."""
    response.headers["Location"] = f"/jobs/{job['id']}"
    return JobAccepted(job_id=job["id"], kind=job["kind"], state=job["state"],
                       status_url=response.headers["Location"],
                       result_url=f"{result_collection}/{job['id']}")


class BoundedJSON:
    """JSON text appended piece by piece, at most `limit` bytes (every piece is ASCII: Python's
    json.dumps escapes the rest, and the index stores its metadata that way)."""

    def __init__(self, limit: int, advice: str):
        self.parts: list[str] = []
        self.size, self.limit, self.advice = 0, limit, advice

    def add(self, text: str) -> None:
        self.size += len(text)
        if self.size > self.limit:
            raise APIError(413, "response_too_large", f"the answer would exceed the limit of "
                           f"{self.limit} bytes: {self.advice}")
        self.parts.append(text)

    def array(self, texts: Iterable[str]) -> None:
        self.add("[")
        for i, text in enumerate(texts):
            self.add(text if i == 0 else "," + text)
        self.add("]")

    def response(self) -> Response:
        return Response("".join(self.parts), media_type="application/json")


def _item(key: str, metadata: str | None, score: float | None = None) -> str:
    scored = "" if score is None else f',"score":{float(score)!r}'
    return f'{{"key":{json.dumps(key)}{scored},"metadata":{metadata or "null"}}}'


def search_response(index: str, model_id: str, rows, limit: int) -> Response:
    """A `SearchResults` body of hits whose metadata is raw JSON text."""
    out = BoundedJSON(limit, "ask for fewer queries or a smaller k")
    out.add(f'{{"index":{json.dumps(index)},"model_id":{json.dumps(model_id)},"results":[')
    for i, row in enumerate(rows):
        if i:
            out.add(",")
        out.array(_item(h.key, h.metadata, h.score) for h in row)
    out.add("]}")
    return out.response()


def items_response(index: str, shown: dict, limit: int) -> Response:
    """An `ItemsPage` body from the fields of a `Page` (byorl.service.api.pagination.page) whose
    items are (key, raw JSON metadata) pairs."""
    out = BoundedJSON(limit, "ask for a smaller page (limit)")
    fields = {"index": index, **{k: shown[k] for k in ("count", "offset", "limit", "next_offset")}}
    out.add(json.dumps(fields, separators=(",", ":"))[:-1] + ',"items":')
    out.array(_item(key, metadata) for key, metadata in shown["items"])
    out.add("}")
    return out.response()


def export_response(index: str, fields: dict, shown: dict, page, limit: int) -> Response:
    """An `ExportPage` body: the page's fields, its (key, raw JSON metadata) items, and its
    vectors and pixels as base64 (`page`: a storage ExportPage)."""
    out = BoundedJSON(limit, "ask for a smaller page (limit)")
    head = {"index": index, **fields, "pixel_shape": page.pixel_shape,
            **{k: shown[k] for k in ("count", "offset", "limit", "next_offset")}}
    out.add(json.dumps(head, separators=(",", ":"))[:-1] + ',"items":')
    out.array(_item(key, metadata) for key, metadata in shown["items"])
    for name, array in (("vectors", page.vectors.astype("<f4")), ("pixels", page.pixels)):
        out.add(f',"{name}":"')
        out.add(base64.b64encode(array.tobytes()).decode())
        out.add('"')
    out.add("}")
    return out.response()
