"""Bodies holding long invalid lists are refused at once: pydantic used to build one error per
bad element (25 MB of `[{}, {}, ...]` in /search: 158 s and 10.6 GB to answer 422)."""

import json
import time

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
def test_a_long_invalid_list_is_a_quick_422(client, path, field, rest):
    body = long_bad_list(field, rest)
    start = time.monotonic()
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    took = time.monotonic() - start
    assert r.status_code == 422, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "validation_error" and f"{field}.0" in error["message"]
    assert "more)" not in error["message"]  # stopped at the first bad element
    assert took < 1.0, f"{path}: {took:.2f} s"
