"""The model registry in the service's database (both back-ends): what one process registers or
deletes, every other sees; of concurrent registrations of one model id exactly one wins, by the
database's key; the files' step (`place`, `remove`) and the row commit together or not at all."""

import threading
import time

import pytest

from byorl.service.exceptions import Conflict, NotFound, TooLarge
from byorl.service.storage.database import Database
from byorl.service.storage.model_store import ModelStore


def card(model_id: str, created_at: float = 1.0, sha: str = "ab" * 32) -> dict:
    return {"model_id": model_id, "name": model_id.split("-")[0], "onnx_sha256": sha,
            "created_at": created_at, "embedding_dim": 4}


def test_registered_models_are_listed_found_and_deleted(service_db):
    store = ModelStore(service_db)
    store.register(card("b-2", created_at=2.0), "models/b-2")
    store.register(card("a-1", created_at=1.0), "models/a-1")
    other = ModelStore(Database(service_db.url))  # another process's connection pool
    assert [r["model_id"] for r in other.available()] == ["a-1", "b-2"]
    record = other.get("b-2")
    assert record["path"] == "models/b-2" and record["state"] == "available"
    assert record["card"]["embedding_dim"] == 4 and record["onnx_sha256"] == "ab" * 32
    assert record["name"] == "b" and other.count() == 2
    with pytest.raises(Conflict) as info:
        other.register(card("b-2"), "models/b-2")
    assert info.value.code == "model_exists"
    removed = []
    assert other.delete("b-2", removed.append)["model_id"] == "b-2"
    assert removed == ["models/b-2"]
    assert store.get("b-2") is None and store.count() == 1 and store.known() == {"a-1", "b-2"}
    for missing in ("b-2", "nope", "../models", ".x"):
        assert store.get(missing) is None
        with pytest.raises(NotFound) as info:
            store.delete(missing)
        assert info.value.code == "model_not_found"
    with pytest.raises(Conflict, match="another file"):  # the id of a deleted model, other bytes
        store.register(card("b-2", sha="cd" * 32), "models/b-2")
    store.register(card("b-2", created_at=3.0), "models/b-2")  # the same model, again
    assert [r["model_id"] for r in other.available()] == ["a-1", "b-2"]


def test_a_failed_file_step_changes_nothing(service_db):
    store = ModelStore(service_db)

    def fail(*_):
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.register(card("m-1"), "models/m-1", fail)
    assert store.get("m-1") is None and store.known() == set()
    store.register(card("m-1"), "models/m-1")
    with pytest.raises(OSError):
        store.delete("m-1", fail)
    assert store.get("m-1")["state"] == "available"


def test_the_limit_on_user_models_counts_available_ones(service_db):
    store = ModelStore(service_db)
    store.register(card("m-1"), "models/m-1", max_models=2)
    store.register(card("m-2"), "models/m-2", max_models=2)
    with pytest.raises(TooLarge) as info:
        store.register(card("m-3"), "models/m-3", max_models=2)
    assert info.value.code == "too_many_models" and store.get("m-3") is None
    store.delete("m-1")
    store.register(card("m-3"), "models/m-3", max_models=2)


def test_folders_stored_before_the_registry_are_adopted_once(service_db):
    store = ModelStore(service_db)
    assert store.adopt(card("old-1", created_at=0.5), "models/old-1")
    assert not store.adopt(card("old-1"), "models/old-1")
    store.delete("old-1")
    assert not store.adopt(card("old-1"), "models/old-1")  # deleted stays deleted
    assert store.get("old-1") is None


@pytest.mark.parametrize("revive", [False, True], ids=["new", "deleted-before"])
def test_concurrent_registrations_of_one_model_make_one(service_db, revive):
    """Six processes' registrations at one instant, each holding its transaction open while
    its files move: one succeeds, five are 409, whatever the rename would say."""
    if revive:
        ModelStore(service_db).register(card("race-1"), "models/race-1")
        ModelStore(service_db).delete("race-1")
    start, placed, outcomes = threading.Barrier(6), [], []

    def place():
        placed.append(threading.get_ident())
        time.sleep(0.2)  # the rename, slow: the others' transactions meet this one

    def register():
        db = Database(service_db.url)
        try:
            start.wait()
            ModelStore(db).register(card("race-1"), "models/race-1", place)
            outcomes.append("created")
        except Conflict as exc:
            outcomes.append(exc.code)
        finally:
            db.close()

    threads = [threading.Thread(target=register) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] + ["model_exists"] * 5
    assert len(placed) == 1  # the losers waited on the winner's row, and never moved files
    assert ModelStore(service_db).count() == 1
