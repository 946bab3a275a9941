import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient

from byorl.service.main import create_app
from byorl.service.settings import Settings


def test_search_by_image_and_by_embedding(client, labeled):
    images, labels, _ = labeled
    keys = [f"k{i}" for i in range(0, len(images), 4)]
    imgs = [images[i] for i in range(0, len(images), 4)]
    assert client.post("/indexes", json={"name": "search"}).status_code == 201
    for start in range(0, len(keys), 16):  # max_images per request is 16 here
        r = client.post("/indexes/search/items",
                        json={"keys": keys[start:start + 16], "images": imgs[start:start + 16]})
        assert r.status_code == 201, r.text

    queries = [imgs[3], imgs[7]]
    by_image = client.post("/search", json={"index": "search", "images": queries, "k": 5}).json()
    for q, hits in zip((3, 7), by_image["results"], strict=True):
        assert hits[0]["key"] == keys[q] and abs(hits[0]["score"] - 1) < 1e-5
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and len(hits) == 5

    emb = np.asarray(client.post("/embed", json={"images": queries}).json()["embeddings"])
    by_vector = client.post("/search", json={"index": "search", "embeddings": emb.tolist(),
                                             "k": 5}).json()
    assert [[h["key"] for h in row] for row in by_vector["results"]] == \
        [[h["key"] for h in row] for row in by_image["results"]]
    # Scores are cosine similarities of the embeddings.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    top2 = by_vector["results"][0][1]
    other = client.post("/embed", json={"images": [imgs[keys.index(top2["key"])]]}).json()
    v = np.asarray(other["embeddings"][0])
    assert abs(top2["score"] - unit[0] @ (v / np.linalg.norm(v))) < 1e-4

    client.delete(f"/indexes/search/items/{keys[3]}")
    hits = client.post("/search", json={"index": "search", "images": [imgs[3]], "k": 3}).json()
    assert keys[3] not in [h["key"] for h in hits["results"][0]]


@pytest.fixture(scope="module")
def legacy_gallery(model_dir, tmp_path_factory, labeled):
    """A gallery holding an item with 1 MiB of metadata, stored before the limit was lowered
    (the api restarted with today's limits, small here: 1 KiB per item, 64 hits, 64 KiB)."""
    data, images = tmp_path_factory.mktemp("legacy"), labeled[0]
    base = {"model_dir": model_dir, "data_dir": data, "threads": 1, "max_images": 16}
    with TestClient(create_app(Settings(**base, max_body_bytes=4 * 2**20,
                                        max_metadata_bytes=2 * 2**20))) as old:
        assert old.post("/indexes", json={"name": "g"}).status_code == 201
        r = old.post("/indexes/g/items", json={
            "keys": ["legacy", "a", "b"], "images": images[:3],
            "metadata": [{"blob": "x" * 2**20}, {"n": 1}, {"n": 2}]})
        assert r.status_code == 201, r.text
    limits = {"max_metadata_bytes": 1024, "max_search_results": 64,
              "max_response_bytes": 64 * 1024}
    with TestClient(create_app(Settings(**base, **limits))) as client:
        yield client, images


def test_the_blow_up_shape_is_refused_within_bounded_memory(legacy_gallery):
    """The shape that took the api to 23 GB (huge metadata x many queries x large k), small."""
    client, images = legacy_gallery
    legacy = client.post("/embed", json={"images": images[:1]}).json()["embeddings"][0]
    query = {"index": "g", "embeddings": [legacy] * 16, "k": 4}  # 16 x 4 = the 64 allowed
    tracemalloc.start()
    try:
        r = client.post("/search", json=query)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak traced memory of the refused search: {peak} bytes")
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "response_too_large"
    assert "65536 bytes" in r.json()["error"]["message"]
    assert peak < 4 * 2**20, f"{peak} bytes traced: the 16 MiB of metadata hits were built"

    r = client.post("/search", json={**query, "k": 5})  # 80 hits
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "too_many_results"
    assert "queries x k = 80; the limit is 64" in r.json()["error"]["message"]


def test_answers_within_the_limits_are_whole(legacy_gallery):
    client, images = legacy_gallery
    queries = client.post("/embed", json={"images": images[1:3]}).json()["embeddings"]
    r = client.post("/search", json={"index": "g", "embeddings": queries, "k": 3})
    assert r.status_code == 413  # all three items: the legacy one is too large to answer
    hits = client.post("/search", json={"index": "g", "embeddings": queries, "k": 1}).json()
    assert [[(h["key"], h["metadata"]) for h in row] for row in hits["results"]] == [
        [("a", {"n": 1})], [("b", {"n": 2})]]
    assert hits["index"] == "g" and abs(hits["results"][0][0]["score"] - 1) < 1e-5

    assert client.get("/indexes/g/items").status_code == 413  # the legacy item is on the page
    page = client.get("/indexes/g/items", params={"offset": 1}).json()
    assert page == {"index": "g", "count": 3, "offset": 1, "limit": 100, "next_offset": None,
                    "items": [{"key": "a", "metadata": {"n": 1}},
                              {"key": "b", "metadata": {"n": 2}}]}
