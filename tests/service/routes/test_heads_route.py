"""POST /linear-head: an empty labeled set is a 422 naming the empty field, never a 500."""

import pytest


@pytest.mark.parametrize("source", [{"images": []}, {"index": "any", "keys": []}])
def test_an_empty_labeled_set_is_a_422_naming_it(client, source):
    r = client.post("/linear-head", json={"classes": ["a", "b"], "labels": [0, 1], **source})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    field = "images" if "images" in source else "keys"
    assert error["code"] == "validation_error"
    assert f"{field}: List should have at least 1 item" in error["message"]
