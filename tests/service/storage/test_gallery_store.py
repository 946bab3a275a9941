"""One gallery on disk: exact reopening from the database and the vector file whatever state a
crash left the file in, all-or-nothing writes, and SIGKILLs of a real writer process."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from byorl.index.faiss_index import DuplicateKeyError, TrainingError, UnknownKeyError
from byorl.service.exceptions import TooLarge
from byorl.service.storage.gallery_store import (
    DB_FILE,
    ID_FILE,
    TRAINED_FILE,
    VECTOR_FILE,
    GalleryStore,
    create_store,
)
from tests.conftest import ROOT

DIM = 8


def items(keys: list[str]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Vectors, pixels and metadata derived from each key (so a reader can check them)."""
    seeds = [int.from_bytes(k.encode()[-6:], "little") for k in keys]
    rngs = [np.random.default_rng(s) for s in seeds]
    vectors = np.stack([r.normal(size=DIM) for r in rngs]).astype(np.float32)
    pixels = np.stack([r.integers(0, 256, (3, 4, 4), dtype=np.uint8) for r in rngs])
    return vectors, pixels, [{"key": k} for k in keys]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def check_exact(store: GalleryStore, keys: list[str]) -> None:
    """The store holds exactly `keys`, each with its vector, pixels and metadata."""
    assert sorted(store.index.keys()) == sorted(keys)
    if not keys:
        return
    vectors, pixels, meta = items(keys)
    got = np.stack([store.index.get(k).vector for k in keys])
    np.testing.assert_allclose(got, unit(vectors), rtol=1e-6)
    np.testing.assert_array_equal(store.pixels(keys), pixels)
    assert [store.index.get(k).metadata for k in keys] == meta
    assert store.index.search(unit(vectors[:1]), 1)[0][0].key == keys[0]


def add(store: GalleryStore, keys: list[str]) -> None:
    vectors, pixels, meta = items(keys)
    store.add(keys, vectors, pixels, meta, "m")


def info(root: Path, name: str) -> object:
    con = sqlite3.connect(root / DB_FILE)
    try:
        row = con.execute("SELECT value FROM info WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0])
    finally:
        con.close()


def sizes(root: Path) -> tuple[int, int]:
    return (root / VECTOR_FILE).stat().st_size, (root / ID_FILE).stat().st_size


@pytest.fixture
def store(tmp_path):
    s = create_store(tmp_path / "g", DIM, "m", "Flat")
    yield s
    s.close()


def keys_of(n: int, start: int = 0) -> list[str]:
    return [f"key-{i:06d}" for i in range(start, start + n)]


def test_reopens_exactly_from_the_database_alone(store):
    add(store, keys_of(30))
    store.remove(keys_of(5))
    store.close(checkpoint=False)  # the vector file holds nothing yet
    assert not (store.root / VECTOR_FILE).exists() or info(store.root, "vector_rows") == 0
    again = GalleryStore(store.root)
    check_exact(again, keys_of(25, 5))
    assert info(store.root, "vector_rows") == 25  # the file was filled in on opening
    again.close()
    check_exact(GalleryStore(store.root), keys_of(25, 5))


def test_opening_trusts_only_the_committed_records_of_the_vector_file(store):
    add(store, keys_of(20))
    store.checkpoint()
    add(store, keys_of(10, 20))  # not checkpointed
    store.close(checkpoint=False)
    for name in (VECTOR_FILE, ID_FILE):  # torn rows of a killed checkpoint, then garbage
        with open(store.root / name, "ab") as f:
            f.write(b"\x01" * 3000)
    again = GalleryStore(store.root)
    check_exact(again, keys_of(30))
    again.close()
    assert sizes(store.root) == (30 * 4 * DIM, 30 * 8) and info(store.root, "vector_rows") == 30


def test_a_removed_key_id_is_never_reused(store):
    add(store, keys_of(3))
    store.checkpoint()  # the file holds the vector of key 2
    store.remove(keys_of(1, 2))
    store.close()
    again = GalleryStore(store.root)
    add(again, ["other"])
    again.close()
    check_exact(GalleryStore(store.root), [*keys_of(2), "other"])


def test_a_mostly_dead_vector_file_is_rewritten_on_opening(store):
    add(store, keys_of(3000))
    store.checkpoint()
    store.remove(keys_of(2900))
    store.close()
    size = (store.root / VECTOR_FILE).stat().st_size
    again = GalleryStore(store.root)
    check_exact(again, keys_of(100, 2900))
    assert (store.root / VECTOR_FILE).stat().st_size == size * 100 // 3000
    again.close()


def test_refused_writes_change_nothing(store):
    add(store, keys_of(4))
    with pytest.raises(DuplicateKeyError):  # one new key, one already present
        add(store, ["new", keys_of(1)[0]])
    with pytest.raises(UnknownKeyError):  # one present, one unknown: nothing removed
        store.remove([keys_of(1)[0], "unknown"])
    check_exact(store, keys_of(4))
    store.close()
    check_exact(GalleryStore(store.root), keys_of(4))


@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW8"])
def test_approximate_types_reopen_with_their_trained_state(tmp_path, factory):
    s = create_store(tmp_path / "g", DIM, "m", factory)
    if factory.startswith("IVF"):
        with pytest.raises(TrainingError):  # too few vectors to train: nothing written
            add(s, keys_of(2))
        assert not (s.root / TRAINED_FILE).exists() and len(s.index) == 0
    add(s, keys_of(200))
    add(s, keys_of(50, 200))
    s.remove(keys_of(10))
    queries = unit(items(keys_of(20, 100))[0])
    before = s.index.search(queries, 5)
    s.close()
    again = GalleryStore(s.root)
    assert (s.root / TRAINED_FILE).exists() == factory.startswith("IVF")
    assert [[h.key for h in row] for row in again.index.search(queries, 5)] == \
        [[h.key for h in row] for row in before]
    check_exact(again, keys_of(240, 10))
    again.close()


def test_a_read_only_store_writes_nothing(store):
    add(store, keys_of(5))
    mtime = (store.root / DB_FILE).stat().st_mtime_ns
    reader = GalleryStore(store.root, writable=False)
    check_exact(reader, keys_of(5))
    reader.close()
    assert (store.root / VECTOR_FILE).stat().st_size == 0 and info(store.root, "vector_rows") == 0
    assert (store.root / DB_FILE).stat().st_mtime_ns == mtime


WRITER = """
import sys, numpy as np
from pathlib import Path
from byorl.service.storage.galleries import Galleries
from tests.service.storage.test_gallery_store import items
data, start = Path(sys.argv[1]), int(sys.argv[2])
g = Galleries(data, checkpoint_s=0.001)  # checkpoints all the time: kills land in them too
if "g" not in g.names():
    g.create("g", 8, "m")
for i in range(start, start + 100_000):
    keys = [f"key-{i:06d}-{j}" for j in range(20)]
    vectors, pixels, meta = items(keys)
    g.add("g", keys, vectors, pixels, meta, "m")
    print("added", i, flush=True)
    if i % 3 == 0:
        g.remove("g", keys[:10])
        print("removed", i, flush=True)
"""


def batch(i: int) -> list[str]:
    return [f"key-{i:06d}-{j}" for j in range(20)]


def test_a_writer_killed_at_any_moment_keeps_every_answered_write(tmp_path):
    """SIGKILL a process that adds, removes and checkpoints: every answered write is there, the
    write in flight is there whole or not at all, a checkpoint in flight costs nothing."""
    root, answered = tmp_path / "indexes" / "g", {}  # key -> present after the answered writes
    torn_checkpoints, start, rng = 0, 0, np.random.default_rng(0)
    for trial in range(12):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(start)],
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [child.stdout.readline().strip()]  # the first write is answered
        assert lines[0] == f"added {start}"
        time.sleep(rng.uniform(0, 0.2))
        child.send_signal(signal.SIGKILL)
        lines += child.stdout.read().splitlines()
        child.wait()
        for line in lines:
            what, i = line.split()
            if what == "added":
                answered.update(dict.fromkeys(batch(int(i)), True))
            else:
                answered.update(dict.fromkeys(batch(int(i))[:10], False))
        last = int(lines[-1].split()[1])
        if lines[-1] == f"added {last}" and last % 3 == 0:  # its removal was in flight
            in_flight = set(batch(last)[:10])
        else:  # the next add was
            in_flight = set(batch(last + 1))
        start = last + 2
        rows = info(root, "vector_rows")
        vector_bytes, id_bytes = sizes(root)
        torn_checkpoints += vector_bytes > rows * 4 * DIM or id_bytes > rows * 8

        store = GalleryStore(root)
        present = set(store.index.keys())
        expected = {k for k, alive in answered.items() if alive}
        assert present - in_flight == expected - in_flight
        assert in_flight <= present or not in_flight & present  # whole or not at all
        check_exact(store, sorted(present))
        store.close()
        answered.update({k: k in present for k in in_flight})
        if trial >= 3 and torn_checkpoints:
            break
    assert torn_checkpoints >= 1, "no kill landed inside a checkpoint"


def test_an_export_page_holds_the_stored_items_within_its_byte_budget(store):
    keys = keys_of(10)
    add(store, keys)
    store.remove(keys[2:3])
    live = keys[:2] + keys[3:]
    vectors, pixels, meta = items(live)
    page = store.export_page(0, 100, 10**6)
    assert page.count == 9 and page.keys == live and page.pixel_shape == [3, 4, 4]
    assert [json.loads(m) for m in page.metadata] == meta
    np.testing.assert_allclose(page.vectors, unit(vectors), rtol=1e-6)
    np.testing.assert_array_equal(page.pixels, pixels)
    assert store.export_page(4, 3, 10**6).keys == live[4:7]
    # each item: key 10 + metadata 21 + vector 32 + pixels 48 bytes = 111
    assert store.export_page(0, 100, 3 * 111 + 110).keys == live[:3]
    with pytest.raises(TooLarge, match="alone"):
        store.export_page(0, 100, 100)
    assert store.export_page(50, 10, 10**6).keys == []


def test_an_empty_gallery_exports_an_empty_page(store):
    page = store.export_page(0, 10, 1000)
    assert (page.count, page.keys, page.pixel_shape) == (0, [], None)
    assert page.vectors.shape == (0, DIM)
