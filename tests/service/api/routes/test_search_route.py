import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient

from byorl.service.main import create_app
from byorl.service.settings import Settings


def test_search_by_image_and_by_embedding(gallery_client, labeled):
    client = gallery_client
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


@pytest.fixture(scope="module")
def filtered(gallery_client, labeled):
    """Galleries "filter-<type>" of 32 images with metadata, and the embeddings of the items."""
    client = gallery_client
    images = labeled[0][:32]
    keys = [f"f{i}" for i in range(32)]
    metadata = [{"source": ["web", "scan"][i % 2], "label": i % 4, "n": i} for i in range(32)]
    metadata[5] = {"source": "web", "label": "1", "n": 5}  # a string, never the number 1
    metadata[7] = {"source": "web", "label": True, "n": 7}  # true, never 1
    metadata[9] = [{"label": 1}]  # not an object: never matches
    vectors = np.concatenate([client.post("/embed", json={"images": images[s:s + 16]}).json()[
        "embeddings"] for s in (0, 16)])
    for factory in ("Flat", "IVF4,Flat", "HNSW16"):
        name = f"filter-{factory.split(',')[0].lower()}"
        assert client.post("/indexes", json={"name": name, "factory": factory}).status_code == 201
        for s in (0, 16):
            r = client.post(f"/indexes/{name}/items", json={
                "keys": keys[s:s + 16], "images": images[s:s + 16],
                "metadata": metadata[s:s + 16]})
            assert r.status_code == 201, r.text
    return keys, metadata, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(vectors, queries, matching, k):
    """Keys and cosine scores of the k items in `matching` most similar to each query."""
    q = np.asarray(queries) / np.linalg.norm(queries, axis=1, keepdims=True)
    cosine = q @ vectors[matching].T
    return [([f"f{matching[j]}" for j in np.argsort(-row)[:k]], np.sort(row)[::-1][:k])
            for row in cosine]


def test_a_filter_applies_before_k(gallery_client, filtered):
    client = gallery_client
    keys, metadata, vectors = filtered
    queries = (vectors[[0, 13]] + 0.3 * vectors[[21, 2]]).tolist()
    for spec, want in [
        ({"source": "web"}, lambda m: m["source"] == "web"),
        ({"label": {"in": [1, 3]}}, lambda m: m["label"] in (1, 3) and m["label"] is not True),
        ({"source": "scan", "label": 1.0}, lambda m: m["source"] == "scan" and m["label"] == 1),
        ({"label": "1"}, lambda m: m["label"] == "1"),
        ({"label": True}, lambda m: m["label"] is True),
    ]:
        matching = [i for i, m in enumerate(metadata) if isinstance(m, dict) and want(m)]
        r = client.post("/search", json={"index": "filter-flat", "embeddings": queries, "k": 5,
                                         "filter": spec})
        assert r.status_code == 200, r.text
        for row, (want_keys, scores) in zip(r.json()["results"],
                                            brute_force(vectors, queries, matching, 5),
                                            strict=True):
            assert [h["key"] for h in row] == want_keys, spec
            np.testing.assert_allclose([h["score"] for h in row], scores, atol=1e-5)
            assert all(h["metadata"] == metadata[int(h["key"][1:])] for h in row)
    # fewer matches than k: those that match; none: empty lists
    few = client.post("/search", json={"index": "filter-flat", "embeddings": queries, "k": 10,
                                       "filter": {"n": {"in": [3, 4, 9, 99]}}}).json()
    assert [sorted(h["key"] for h in row) for row in few["results"]] == [["f3", "f4"]] * 2
    none = client.post("/search", json={"index": "filter-flat", "embeddings": queries,
                                        "filter": {"source": "fax"}}).json()
    assert none["results"] == [[], []]


def test_filters_by_image_and_after_removals(gallery_client, filtered, labeled):
    client = gallery_client
    keys, metadata, vectors = filtered
    spec = {"source": "web", "label": 0}  # f0, f4, f8, ... (f0 and f16 removed below)
    by_image = client.post("/search", json={"index": "filter-flat", "images": [labeled[0][4]],
                                            "k": 3, "filter": spec}).json()["results"][0]
    assert by_image[0]["key"] == "f4" and abs(by_image[0]["score"] - 1) < 1e-5
    for name in ("filter-flat", "filter-hnsw16"):
        for key in ("f0", "f16"):
            assert client.delete(f"/indexes/{name}/items/{key}").status_code == 200
        r = client.post("/search", json={"index": name, "embeddings": vectors[[0, 16]].tolist(),
                                         "k": 10, "filter": spec}).json()
        assert [sorted(h["key"] for h in row) for row in r["results"]] == [
            ["f12", "f20", "f24", "f28", "f4", "f8"]] * 2


@pytest.mark.parametrize("name", ["filter-ivf4", "filter-hnsw16"])
def test_approximate_galleries_honour_the_filter(gallery_client, filtered, name):
    client = gallery_client
    keys, metadata, vectors = filtered
    spec = {"source": "scan", "label": {"in": [1, 3]}}
    matching = [i for i, m in enumerate(metadata)
                if isinstance(m, dict) and m["source"] == "scan" and m["label"] in (1, 3)]
    queries = vectors[[2, 11, 30]].tolist()
    r = client.post("/search", json={"index": name, "embeddings": queries, "k": 4,
                                     "filter": spec})
    assert r.status_code == 200, r.text
    for row, (want_keys, _) in zip(r.json()["results"],
                                   brute_force(vectors, queries, matching, 4), strict=True):
        assert all(int(h["key"][1:]) in matching for h in row)
        assert [h["key"] for h in row] == want_keys  # few matches: scored exactly


@pytest.mark.parametrize("spec, code, message", [
    ({"label": [1, 2]}, "validation_error", "filter: Value error, filter field 'label': a list "
     "is not a value; for membership write {\"in\": [...]}"),
    ({"label": {"eq": 1}}, "validation_error", "unknown operator(s) ['eq']"),
    ({"label": {"in": [{"a": 1}]}}, "validation_error", "values are JSON scalars"),
    ({"label": {"in": 3}}, "validation_error", "\"in\" takes a list"),
    ([["label", 1]], "validation_error", "filter: Input should be an object"),
    ({f"f{i}": 1 for i in range(17)}, "filter_too_large", "17 fields; the limit is 16"),
    ({"n": {"in": list(range(1025))}}, "filter_too_large", "the limit is 1024"),
])
def test_invalid_filters_are_refused(gallery_client, filtered, spec, code, message):
    client = gallery_client
    r = client.post("/search", json={"index": "filter-flat", "embeddings": [[1.0] * 8],
                                     "filter": spec})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code and message in r.json()["error"]["message"], r.text
