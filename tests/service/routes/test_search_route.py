import numpy as np


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
