import base64
import io
import threading
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from byorl.service.main import create_app


def test_add_list_remove_and_survive_a_restart(gallery_client, gallery_settings, labeled):
    client, settings = gallery_client, gallery_settings
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


def test_delete_index(gallery_client, labeled):
    client = gallery_client
    images = labeled[0]
    assert client.post("/indexes", json={"name": "scratch"}).status_code == 201
    client.post("/indexes/scratch/items", json={"keys": ["a"], "images": images[:1]})
    assert client.delete("/indexes/scratch").status_code == 204
    assert client.get("/indexes/scratch").status_code == 404
    assert client.post("/indexes", json={"name": "scratch"}).json()["count"] == 0  # reusable


def test_any_key_but_nul_and_no_impossible_name_reaches_the_store(gallery_client, labeled):
    """A NUL in a key is refused (422) and one in a path is not found (404) on every back-end:
    PostgreSQL's text cannot hold it, and on Milvus + PostgreSQL these were 500s; so were keys
    with ' or \\ removed from a gallery on Milvus."""
    client, images = gallery_client, labeled[0]
    assert client.post("/indexes", json={"name": "odd"}).status_code == 201
    r = client.post("/indexes/odd/items", json={"keys": ["a\x00b"], "images": images[:1]})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error")
    assert client.get("/indexes/a%00b").json()["error"]["code"] == "index_not_found"
    assert client.delete("/indexes/a%00b").json()["error"]["code"] == "index_not_found"
    r = client.delete("/indexes/odd/items/a%00b")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "key_not_found")
    keys = ["it's", "back\\slash", "\\"]
    r = client.post("/indexes/odd/items", json={"keys": keys, "images": images[:3]})
    assert r.status_code == 201, r.text
    for n, key in enumerate(keys, 1):
        r = client.delete(f"/indexes/odd/items/{quote(key)}")
        assert r.status_code == 200 and r.json()["count"] == 3 - n, r.text


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


def test_an_items_pixels_come_back_as_the_png_it_was_embedded_from(gallery_client, image_bytes):
    client = gallery_client
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


def export_all(client, name: str, limit: int = 1000) -> tuple[list[dict], np.ndarray, np.ndarray,
                                                              dict]:
    """Every item of a gallery with its vectors and pixels, page by page."""
    items, vectors, pixels, offset, page = [], [], [], 0, None
    while offset is not None:
        r = client.get(f"/indexes/{name}/export", params={"offset": offset, "limit": limit})
        assert r.status_code == 200, r.text[:300]
        page = r.json()
        n = len(page["items"])
        items += page["items"]
        vectors.append(np.frombuffer(base64.b64decode(page["vectors"]), "<f4").reshape(
            n, page["dim"]))
        pixels.append(np.frombuffer(base64.b64decode(page["pixels"]), np.uint8).reshape(
            n, *page["pixel_shape"]))
        offset = page["next_offset"]
    return items, np.concatenate(vectors), np.concatenate(pixels), page


def vectors_body(keys, vectors, pixels, card, metadata=None, **changes) -> dict:
    return {"keys": keys, "metadata": metadata, "model_id": card["model_id"],
            "onnx_sha256": card["onnx_sha256"],
            "vectors": base64.b64encode(np.asarray(vectors, "<f4").tobytes()).decode(),
            "pixels": base64.b64encode(np.asarray(pixels, np.uint8).tobytes()).decode(),
            **changes}


@pytest.fixture(scope="module")
def exported(gallery_client, labeled):
    """A gallery of 12 images with metadata, exported: (items, vectors, pixels, last page)."""
    client = gallery_client
    images = labeled[0][:12]
    assert client.post("/indexes", json={"name": "to-export"}).status_code == 201
    r = client.post("/indexes/to-export/items", json={
        "keys": [f"k/{i}" for i in range(12)], "images": images,
        "metadata": [{"i": i, "s": "é"} if i % 3 else None for i in range(12)]})
    assert r.status_code == 201, r.text
    return export_all(client, "to-export", limit=5)


def test_an_export_added_as_vectors_searches_as_the_original(gallery_client, gallery_settings,
                                                             exported, labeled):
    client = gallery_client
    items, vectors, pixels, page = exported
    card = client.get("/models").json()[0]
    assert [i["key"] for i in items] == [f"k/{i}" for i in range(12)]
    assert items[1]["metadata"] == {"i": 1, "s": "é"} and items[3]["metadata"] is None
    assert (page["model_id"], page["onnx_sha256"], page["factory"]) == (
        card["model_id"], card["onnx_sha256"], "HNSW16" if gallery_settings.milvus_uri else "Flat")
    assert pixels.shape == (12, 3, 32, 32) and vectors.shape == (12, page["dim"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(pixels[4], client.app.state.byorl.galleries.pixels(
        "to-export", ["k/4"])[0])

    assert client.post("/indexes", json={"name": "restored"}).status_code == 201
    for start in (0, 7):  # two requests
        part = slice(start, start + 7)
        r = client.post("/indexes/restored/vectors", json=vectors_body(
            [i["key"] for i in items[part]], vectors[part], pixels[part], card,
            [i["metadata"] for i in items[part]]))
        assert r.status_code == 201, r.text
    assert r.json() == {"index": "restored", "added": 5, "count": 12}
    queries = labeled[0][20:23]
    found = [client.post("/search", json={"index": name, "images": queries, "k": 4}).json()
             ["results"] for name in ("to-export", "restored")]
    assert [[h["key"] for h in row] for row in found[0]] == \
        [[h["key"] for h in row] for row in found[1]]
    np.testing.assert_allclose([[h["score"] for h in row] for row in found[0]],
                               [[h["score"] for h in row] for row in found[1]], atol=1e-5)
    assert export_all(client, "restored")[0] == items


def test_add_vectors_refusals(gallery_client, exported, gallery_settings):
    client, settings = gallery_client, gallery_settings
    items, vectors, pixels, _ = exported
    card = client.get("/models").json()[0]
    keys = ["new/0", "new/1"]
    assert client.post("/indexes", json={"name": "refusing"}).status_code == 201

    def refused(body: dict, name: str = "refusing") -> tuple[int, str]:
        r = client.post(f"/indexes/{name}/vectors", json=body)
        return r.status_code, r.json()["error"]["code"]

    good = vectors_body(keys, vectors[:2], pixels[:2], card)
    assert refused(good, "nowhere") == (404, "index_not_found")
    assert refused({**good, "model_id": "other-model"}) == (409, "model_mismatch")
    assert refused({**good, "onnx_sha256": "0" * 64}) == (409, "model_hash_mismatch")
    assert refused({**good, "onnx_sha256": "not-a-hash"}) == (422, "validation_error")
    assert refused({**good, "vectors": "@@@"}) == (422, "invalid_base64")
    assert refused(vectors_body(keys, vectors[:1], pixels[:2], card)) == (422, "invalid_vectors")
    assert refused(vectors_body(keys, vectors[:2], pixels[:2, :, :16], card)) == (
        422, "invalid_pixels")
    assert refused({**good, "metadata": [1]}) == (422, "validation_error")
    assert refused({**good, "metadata": [{"s": "x" * settings.max_metadata_bytes}, None]}) == (
        413, "metadata_too_large")
    n = settings.max_bulk_images + 1
    many = vectors_body([f"m/{i}" for i in range(n)], np.repeat(vectors[:1], n, 0),
                        np.repeat(pixels[:1, :, :8, :8], n, 0), card)  # within the body limit
    assert refused(many) == (413, "too_many_items")
    zero = vectors_body(keys, np.zeros_like(vectors[:2]), pixels[:2], card)
    assert refused(zero) == (422, "invalid_vector")
    assert client.post("/indexes/refusing/vectors", json=good).status_code == 201
    assert refused(good) == (409, "duplicate_key")
    assert client.get("/indexes/refusing").json()["count"] == 2


def test_export_refusals_and_pages_bounded_by_the_response_limit(gallery_client, exported,
                                                                 gallery_settings, tmp_path):
    client, settings = gallery_client, gallery_settings
    assert client.get("/indexes/nowhere/export").status_code == 404
    assert client.get("/indexes/to-export/export", params={"limit": 1001}).status_code == 422
    assert client.get("/indexes/to-export/export", params={"offset": 99}).json()["items"] == []
    small = settings.model_copy(update={"data_dir": tmp_path, "max_response_bytes": 20_000})
    with TestClient(create_app(small)) as c:
        c.post("/indexes", json={"name": "g"})
        c.post("/indexes/g/items", json={"keys": list("abcde"),
                                         "images": exported_images(client, 5)})
        page = c.get("/indexes/g/export", params={"limit": 100}).json()
        assert len(page["items"]) == 2 and page["next_offset"] == 2  # 4 KiB an item: 2 fit
        items = export_all(c, "g")[0]
        assert [i["key"] for i in items] == list("abcde")
    tiny = settings.model_copy(update={"data_dir": tmp_path / "t", "max_response_bytes": 4096})
    with TestClient(create_app(tiny)) as c:
        c.post("/indexes", json={"name": "g"})
        c.post("/indexes/g/items", json={"keys": ["a"], "images": exported_images(client, 1)})
        r = c.get("/indexes/g/export")
        assert (r.status_code, r.json()["error"]["code"]) == (413, "response_too_large")


def exported_images(client, n: int) -> list[str]:
    """n images as base64 PNGs of the exported gallery's pixels."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        pixels = client.app.state.byorl.galleries.pixels("to-export", [f"k/{i}"])[0]
        Image.fromarray(pixels.transpose(1, 2, 0)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out
