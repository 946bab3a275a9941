"""POST /linear-head: an empty labeled set is a 422 naming the empty field, never a 500; the
classes of a head (what each of its predictions returns) are bounded."""

import pytest


@pytest.mark.parametrize("source", [{"images": []}, {"index": "any", "keys": []}])
def test_an_empty_labeled_set_is_a_422_naming_it(client, source):
    r = client.post("/linear-head", json={"classes": ["a", "b"], "labels": [0, 1], **source})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    field = "images" if "images" in source else "keys"
    assert error["code"] == "validation_error"
    assert f"{field}: List should have at least 1 item" in error["message"]


def test_classes_are_bounded(client, settings):
    n = settings.max_classes + 1
    r = client.post("/linear-head", json={"classes": [f"c{i}" for i in range(n)],
                                          "labels": [0, 1], "images": ["eA==", "eA=="]})
    assert r.status_code == 413 and r.json()["error"] == {
        "code": "too_many_classes", "message": f"{n} classes; the limit is {n - 1}"}
    r = client.post("/linear-head", json={"classes": ["a", "b" * 257], "labels": [0, 1],
                                          "images": ["eA==", "eA=="]})
    assert r.status_code == 422 and "classes.1" in r.json()["error"]["message"]
