"""One way to page every list endpoint (/jobs, /heads, /audits, /indexes, index items):
`?offset=&limit=` in, `{items, count, offset, limit, next_offset}` out, at most MAX_LIMIT items
per page, so that no listing grows with what is stored; offsets at most MAX_OFFSET (beyond any
collection the service can hold: a larger one is a 422, never an overflow below)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel, Field

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_OFFSET = 10**9

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    count: int = Field(description="Items in the whole collection")
    offset: int
    limit: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")


@dataclass(frozen=True)
class PageQuery:
    offset: int
    limit: int


def page_query(
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET,
                                            description="Items to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page")] = DEFAULT_LIMIT,
) -> PageQuery:
    return PageQuery(offset, limit)


Paging = Annotated[PageQuery, Depends(page_query)]


def page(seq: Sequence, q: PageQuery, to: Callable[[Any], Any] = lambda x: x) -> dict[str, Any]:
    """The fields of a Page over `seq` (in its order); `to` builds only the items shown."""
    return page_of([to(x) for x in seq[q.offset : q.offset + q.limit]], len(seq), q)


def page_of(items: list, count: int, q: PageQuery) -> dict[str, Any]:
    """The fields of a Page whose items were read already (at offset q.offset of `count`)."""
    end = q.offset + len(items)
    return {"items": items, "count": count, "offset": q.offset, "limit": q.limit,
            "next_offset": end if end < count else None}
