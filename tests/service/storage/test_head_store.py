"""Fitted heads in the service's database (both back-ends): what a job saves is what every api
replica reads back, and a deleted head is gone."""

import numpy as np
import pytest

from byorl.service.exceptions import NotFound
from byorl.service.storage.database import Database
from byorl.service.storage.head_store import HeadStore


def test_a_saved_head_reads_back_and_lists_oldest_first(service_db):
    """Also through a second connection pool to the same database (another process)."""
    heads = HeadStore(service_db)
    w, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.5, -1], np.float32)
    heads.save("h2", w, b, {"id": "h2", "classes": ["a", "b"], "created_at": 2.0})
    heads.save("h1", -w, b, {"id": "h1", "classes": ["a", "b"], "created_at": 1.0})
    weight, bias = heads.weights("h2")
    np.testing.assert_array_equal(weight, w)
    np.testing.assert_array_equal(bias, b)
    assert heads.card("h2")["classes"] == ["a", "b"]
    assert [c["id"] for c in HeadStore(Database(service_db.url)).list()] == ["h1", "h2"]


def test_unknown_deleted_and_malformed_ids_are_not_found(service_db):
    heads = HeadStore(service_db)
    heads.save("h", np.zeros((2, 3)), np.zeros(2), {"id": "h", "created_at": 0.0})
    heads.delete("h")
    assert heads.list() == []
    for head_id in ("h", "missing", "../jobs", ".hidden"):
        for call in (heads.card, heads.weights, heads.delete):
            with pytest.raises(NotFound) as info:
                call(head_id)
            assert info.value.code == "head_not_found"
