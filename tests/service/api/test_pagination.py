"""Every list endpoint pages the same way: ?offset&limit in, {items, count, offset, limit,
next_offset} out, at most MAX_LIMIT items a page; walked on real stored jobs, heads, audits,
indexes and items of a fresh data directory."""

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from byorl.service.api.pagination import MAX_LIMIT, MAX_OFFSET, PageQuery, page
from byorl.service.main import create_app
from byorl.service.storage.database import open_database
from byorl.service.storage.head_store import HeadStore
from byorl.service.storage.job_store import JobStore

N = 5  # of each kind


def test_page_slices_and_points_at_the_next_page():
    seq = list(range(7))
    assert page(seq, PageQuery(0, 3), str) == {"items": ["0", "1", "2"], "count": 7, "offset": 0,
                                               "limit": 3, "next_offset": 3}
    last, past = page(seq, PageQuery(6, 3)), page(seq, PageQuery(9, 3))
    assert (last["items"], last["next_offset"]) == ([6], None)
    assert (past["items"], past["next_offset"], past["count"]) == ([], None, 7)


@pytest.fixture(scope="module")
def listed(settings, tmp_path_factory, image_bytes):
    """An app on a fresh data directory holding N of each: jobs (2 of them audits), heads,
    indexes, and items of one index."""
    data = tmp_path_factory.mktemp("paged")
    stored = settings.model_copy(update={"data_dir": data})
    jobs, heads = JobStore.from_settings(stored), HeadStore(open_database(stored.database()))
    for i in range(N):
        jobs.create("audit" if i % 2 else "linear_head", {"n": i})
        heads.save(f"head{i}", np.zeros((2, 4), np.float32), np.zeros(2, np.float32),
                   {"id": f"head{i}", "model_id": "m", "classes": ["a", "b"], "robust": False,
                    "threat": {"norm": "linf", "eps": 0.03}, "metrics": {}, "created_at": i})
    image = base64.b64encode(next(iter(image_bytes.values()))[0]).decode()
    with TestClient(create_app(stored)) as c:
        for i in range(N):
            assert c.post("/indexes", json={"name": f"ix{i}"}).status_code == 201
        r = c.post("/indexes/ix0/items", json={"keys": [f"k{i}" for i in range(N)],
                                               "images": [image] * N})
        assert r.status_code == 201, r.text
        yield c


def walk(client, path: str, limit: int) -> tuple[list, list[dict]]:
    """Every item of a listing, following next_offset; and the pages seen."""
    items, pages, offset = [], [], 0
    while offset is not None:
        r = client.get(path, params={"offset": offset, "limit": limit})
        assert r.status_code == 200, r.text
        pages.append(r.json())
        items += pages[-1]["items"]
        offset = pages[-1]["next_offset"]
    return items, pages


@pytest.mark.parametrize("path,count,ident", [
    ("/jobs", N, "id"), ("/audits", 2, "id"), ("/heads", N, "id"), ("/indexes", N, "name"),
    ("/indexes/ix0/items", N, "key"),
])
def test_every_list_endpoint_pages_the_same_way(listed, path, count, ident):
    whole = listed.get(path).json()  # defaults: offset 0, limit 100
    assert (whole["offset"], whole["limit"], whole["count"]) == (0, 100, count)
    assert whole["next_offset"] is None and len(whole["items"]) == count
    items, pages = walk(listed, path, 2)
    assert [i[ident] for i in items] == [i[ident] for i in whole["items"]]  # stable order
    assert len({i[ident] for i in items}) == count
    assert [p["offset"] for p in pages] == list(range(0, count, 2))
    assert all(p["count"] == count and p["limit"] == 2 for p in pages)


@pytest.mark.parametrize("params", [{"limit": MAX_LIMIT + 1}, {"limit": 0}, {"offset": -1},
                                    {"limit": "many"}, {"offset": MAX_OFFSET + 1},
                                    {"offset": 9223372036854775800, "limit": 10}])
@pytest.mark.parametrize("path", ["/jobs", "/audits", "/heads", "/indexes", "/indexes/ix0/items"])
def test_a_page_past_the_bound_is_a_422(listed, path, params):
    r = listed.get(path, params=params)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error" and next(iter(params)) in error["message"]
