import threading

import numpy as np
from fastapi.testclient import TestClient

from byorl.service.main import create_app


def test_add_list_remove_and_survive_a_restart(client, settings, labeled):
    images, labels, classes = labeled
    picks = list(range(0, len(images), 6))  # 2 per class
    keys = [f"img/{i}" for i in picks]
    meta = [{"class": classes[labels[i]], "n": i} for i in picks]

    r = client.post("/indexes", json={"name": "gallery"})
    assert r.status_code == 201, r.text
    assert r.json()["count"] == 0
    r = client.post("/indexes/gallery/items",
                    json={"keys": keys, "images": [images[i] for i in picks], "metadata": meta})
    assert r.status_code == 201, r.text
    assert r.json() == {"index": "gallery", "added": len(keys), "count": len(keys)}

    page = client.get("/indexes/gallery/items", params={"offset": 2, "limit": 3}).json()
    assert page["count"] == len(keys) and page["offset"] == 2 and page["limit"] == 3
    assert page["next_offset"] == 5
    assert [i["key"] for i in page["items"]] == keys[2:5]
    assert [i["metadata"] for i in page["items"]] == meta[2:5]
    assert [i["name"] for i in client.get("/indexes").json()["items"]].count("gallery") == 1

    r = client.delete(f"/indexes/gallery/items/{keys[0]}")  # a key with a slash
    assert r.status_code == 200 and r.json()["removed"] == 1 and r.json()["count"] == len(keys) - 1

    # A new app on the same data directory: the index, its items and metadata are back.
    with TestClient(create_app(settings)) as again:
        info = again.get("/indexes/gallery").json()
        assert info["count"] == len(keys) - 1
        hits = again.post("/search", json={"index": "gallery", "images": [images[picks[1]]],
                                           "k": 1}).json()["results"][0]
        assert hits[0]["key"] == keys[1] and hits[0]["metadata"] == meta[1]
        pixels = again.app.state.byorl.galleries.pixels("gallery", keys[1:3])
        assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == np.uint8


def test_delete_index(client, labeled):
    images = labeled[0]
    assert client.post("/indexes", json={"name": "scratch"}).status_code == 201
    client.post("/indexes/scratch/items", json={"keys": ["a"], "images": images[:1]})
    assert client.delete("/indexes/scratch").status_code == 204
    assert client.get("/indexes/scratch").status_code == 404
    assert client.post("/indexes", json={"name": "scratch"}).json()["count"] == 0  # reusable


def test_metadata_over_the_per_item_limit_is_refused_whole(client, settings, labeled):
    images, limit = labeled[0], settings.max_metadata_bytes
    assert client.post("/indexes", json={"name": "meta"}).status_code == 201
    fits, over = {"s": "x" * (limit - 10)}, {"s": "x" * limit}  # JSON adds 9 bytes: {"s": ""}
    r = client.post("/indexes/meta/items", json={"keys": ["a", "b"], "images": images[:2],
                                                 "metadata": [fits, over]})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"] == {"code": "metadata_too_large", "message": (
        f"metadata[1] is {limit + 9} bytes as JSON; the limit is {limit} bytes per item")}
    r = client.post("/indexes/meta/items", content=b'{"keys": ["a"], "images": ["%s"], '
                    b'"metadata": [NaN]}' % images[0].encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_metadata", r.text
    assert client.get("/indexes/meta").json()["count"] == 0  # nothing of either was stored
    r = client.post("/indexes/meta/items", json={"keys": ["a"], "images": images[:1],
                                                 "metadata": [fits]})
    assert r.status_code == 201 and client.get("/indexes/meta/items").json()["items"] == [
        {"key": "a", "metadata": fits}]


def test_listing_while_keys_are_removed_is_a_consistent_snapshot(client):
    """Pages listed while another client removes keys (issue 12, item 5): always 200, every
    listed key with its own metadata, the count the one of that instant."""
    svc = client.app.state.byorl
    assert client.post("/indexes", json={"name": "churn"}).status_code == 201
    keys = [f"c{i}" for i in range(1000)]
    vectors = np.random.default_rng(0).normal(size=(1000, svc.models.default.dim))
    svc.galleries.add("churn", keys, vectors, np.zeros((1000, 3, 32, 32), np.uint8),
                    [{"key": k} for k in keys], svc.models.default.model_id)

    def remove_all_but_one():
        for start in range(1, 1000, 9):
            svc.galleries.remove("churn", keys[start : start + 9])

    remover = threading.Thread(target=remove_all_but_one)
    remover.start()
    pages = []
    while remover.is_alive():
        r = client.get("/indexes/churn/items", params={"limit": 1000})
        assert r.status_code == 200, r.text
        pages.append(r.json())
    remover.join()
    assert len(pages) > 1
    for page in pages:
        assert page["count"] == len(page["items"])
        assert all(i["metadata"] == {"key": i["key"]} for i in page["items"])
    assert [i["key"] for i in client.get("/indexes/churn/items").json()["items"]] == ["c0"]


def test_an_items_pixels_come_back_as_the_png_it_was_embedded_from(client, image_bytes):
    import base64
    import io

    from PIL import Image

    blob = image_bytes["frog"][0]
    assert client.post("/indexes", json={"name": "thumbs"}).status_code == 201
    assert client.post("/indexes/thumbs/items", json={
        "keys": ["a/b c"], "images": [base64.b64encode(blob).decode()]}).status_code == 201
    r = client.get("/indexes/thumbs/pixels/a/b c")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    stored = client.app.state.byorl.galleries.pixels("thumbs", ["a/b c"])[0]
    assert np.array_equal(png, stored.transpose(1, 2, 0))  # lossless: the stored pixels
    assert np.array_equal(png, np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
    r = client.get("/indexes/thumbs/pixels/missing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "key_not_found"
    assert client.get("/indexes/nope/pixels/a").json()["error"]["code"] == "index_not_found"
