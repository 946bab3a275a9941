"""Bodies holding long invalid lists are refused at once and at bounded memory: pydantic used to
build one error per bad element (25 MB of `[{}, {}, ...]` in /search: 158 s and 10.6 GB to
answer 422). The time it takes is measured in `bench/bench_hostile.py`, not here."""

import json
import tracemalloc

import pytest

BAD_ELEMENTS = 300_000  # `{},` each: just under the test app's 1 MiB body limit
LISTS = [
    ("/embed", "images", {}),
    ("/search", "embeddings", {"index": "bad"}),
    ("/indexes/bad/items", "images", {"keys": ["a"]}),
    ("/linear-head", "labels", {"classes": ["a", "b"], "images": ["x", "y"]}),
    ("/audits", "images", {"kind": "retrieval", "index": "bad"}),
    ("/heads/nope/predict", "images", {}),
]


def long_bad_list(field: str, rest: dict) -> bytes:
    head = json.dumps(rest)[:-1] + (", " if rest else "")
    return (head + f'"{field}": [' + ",".join(["{}"] * BAD_ELEMENTS) + "]}").encode()


@pytest.mark.parametrize("path,field,rest", LISTS, ids=[p for p, _, _ in LISTS])
def test_a_long_invalid_list_is_refused_at_bounded_memory(client, path, field, rest):
    """No Python object per element: parsing the list alone (300,000 dicts) would allocate
    about 22 MB, one error per element about 360 MB more; the refusal stays within a few MB
    (tracemalloc: the app runs in this process, its allocations are traced)."""
    body = long_bad_list(field, rest)
    tracemalloc.start()
    try:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 422, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "validation_error" and f"{field}.0" in error["message"]
    assert "more)" not in error["message"]  # stopped at the first bad element
    assert peak < 8 * len(body), f"{path}: peak {peak / 2**20:.1f} MiB"
