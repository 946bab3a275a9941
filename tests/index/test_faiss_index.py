import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from byorl.index.faiss_index import (
    CorruptIndexError,
    DimensionMismatchError,
    DuplicateKeyError,
    EmbeddingIndex,
    InvalidMetadataError,
    InvalidVectorError,
    ModelMismatchError,
    TrainingError,
    UnknownKeyError,
)

ROOT = Path(__file__).resolve().parents[2]
DIM = 32
# Exact; inverted lists; graph (removal rebuilds); quantised inverted lists.
FACTORIES = ["Flat", "IVF16,Flat", "HNSW16", "IVF16,PQ16"]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2000, DIM)).astype(np.float32)


def keys_of(n: int, start: int = 0) -> list[str]:
    return [f"item-{i}" for i in range(start, start + n)]


def filled(vectors: np.ndarray, factory: str = "Flat") -> EmbeddingIndex:
    index = EmbeddingIndex(DIM, "model-a", factory, nprobe=16, ef_search=128)
    index.add(keys_of(len(vectors)), vectors, [{"i": i} for i in range(len(vectors))])
    return index


def top1(index: EmbeddingIndex, queries: np.ndarray) -> list[str]:
    return [hits[0].key for hits in index.search(queries, 5)]


def test_flat_search_equals_numpy_cosine_brute_force(vectors):
    index = filled(vectors[:500])
    queries = np.random.default_rng(1).standard_normal((20, DIM)) * 3
    cosine = unit(queries) @ unit(vectors[:500]).T
    for row, hits in zip(cosine, index.search(queries, 10), strict=True):
        order = np.argsort(-row)[:10]
        assert [h.key for h in hits] == [f"item-{i}" for i in order]
        np.testing.assert_allclose([h.score for h in hits], row[order], atol=1e-5)
        assert [h.metadata for h in hits] == [{"i": int(i)} for i in order]


def test_search_edge_cases(vectors):
    empty = EmbeddingIndex(DIM, "model-a")
    assert empty.search(vectors[:3], 5) == [[], [], []]
    index = filled(vectors[:3])
    hits = index.search(vectors[0], 10)  # one query as a 1-D vector; k above the index size
    assert len(hits) == 1 and len(hits[0]) == 3
    assert hits[0][0].key == "item-0" and hits[0][0].score == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        index.search(vectors[0], 0)


@pytest.mark.parametrize("factory", FACTORIES)
def test_each_type_finds_itself_removes_updates_and_round_trips(vectors, factory, tmp_path):
    index = filled(vectors, factory)
    assert len(index) == 2000
    found = np.mean(np.array(top1(index, vectors[:200])) == np.array(keys_of(200)))
    assert found >= (1.0 if "PQ" not in factory else 0.9), found

    assert index.remove(keys_of(100)) == 100
    assert len(index) == 1900 and "item-0" not in index
    returned = {h.key for hits in index.search(vectors[:100], 10) for h in hits}
    assert not returned & set(keys_of(100))
    # items after the removed ones keep their own keys (an IDMap2 around IVF would not)
    found = np.mean(np.array(top1(index, vectors[100:300])) == np.array(keys_of(200, 100)))
    assert found >= (1.0 if "PQ" not in factory else 0.9), found

    index.update("item-500", vectors[0], {"moved": True})
    best = index.search(vectors[0], 1)[0][0]
    assert (best.key, best.metadata) == ("item-500", {"moved": True})
    assert len(index) == 1900

    index.save(tmp_path / "index.bin")
    loaded = EmbeddingIndex.load(tmp_path / "index.bin")
    assert (loaded.dim, loaded.model_id, loaded.factory) == (DIM, "model-a", factory)
    assert loaded.keys() == index.keys()
    queries = vectors[100:150]
    assert [[(h.key, h.score, h.metadata) for h in r] for r in loaded.search(queries, 5)] == [
        [(h.key, h.score, h.metadata) for h in r] for r in index.search(queries, 5)]
    loaded.add(["new"], vectors[1])  # ids keep counting after a load: no clash
    assert loaded.search(vectors[1], 1)[0][0].key == "new"


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_removed_items_are_skipped_then_purged(vectors, factory):
    """Flat and graph types tombstone removed ids (searches skip them) and purge them from FAISS
    past MAX_TOMBSTONES: no search returns a removed key, before or after a purge."""
    index = filled(vectors, factory)
    removed: set[str] = set()
    for start in range(0, 1500, 300):
        batch = keys_of(300, start)
        index.remove(batch[:150])
        index.remove(batch[150:])
        removed |= set(batch)
        hits = index.search(vectors[start : start + 400], 20)
        assert not {h.key for row in hits for h in row} & removed
        assert len(index) == 2000 - len(removed)
    assert index._index.ntotal < 2000  # purged at least once
    if factory == "Flat":  # exact: k = all finds every live item
        everything = index.search(vectors[1999], 2000)[0]
        assert sorted(h.key for h in everything) == sorted(index.keys())


def test_get_returns_the_normalised_vector_and_a_copy_of_the_metadata(vectors):
    index = filled(vectors[:10])
    item = index.get("item-3")
    np.testing.assert_allclose(item.vector, unit(vectors[3:4])[0], atol=1e-6)
    item.metadata["i"] = -1  # callers get copies: the stored metadata is unchanged
    assert index.get("item-3").metadata == {"i": 3}
    with pytest.raises(UnknownKeyError, match="unknown key 'nope'"):
        index.get("nope")


def test_raw_metadata_is_the_stored_json_text(vectors):
    index = filled(vectors[:10])
    index.update("item-4", metadata={"tags": ["a", "\u00e9"], "n": 1.5})
    index.add(["bare"], vectors[20])
    hits = index.search(vectors[4], 10, raw_metadata=True)[0]
    raw = {h.key: h.metadata for h in hits}
    assert raw["bare"] is None and json.loads(raw["item-4"]) == {"tags": ["a", "\u00e9"], "n": 1.5}
    assert {k: None if t is None else json.loads(t) for k, t in raw.items()} == {
        h.key: h.metadata for h in index.search(vectors[4], 10)[0]}
    assert index.get("item-3", raw_metadata=True).metadata == json.dumps({"i": 3})
    assert index.page(3, 2, raw_metadata=True) == (11, [("item-3", json.dumps({"i": 3})),
                                                        ("item-4", raw["item-4"])])
    assert index.page(2**63 - 8, 10) == (11, [])  # past sys.maxsize: an empty page


def test_update_metadata_only_and_unknown_keys(vectors):
    index = filled(vectors[:10])
    index.update("item-2", metadata={"label": "cat"})
    assert index.get("item-2").metadata == {"label": "cat"}
    np.testing.assert_allclose(index.get("item-2").vector, unit(vectors[2:3])[0], atol=1e-6)
    with pytest.raises(UnknownKeyError):
        index.update("nope", metadata={})
    with pytest.raises(UnknownKeyError, match="nope"):
        index.remove(["item-1", "nope"])
    assert len(index) == 10  # a refused removal removes nothing
    assert index.remove(["item-1", "nope", "item-1"], missing_ok=True) == 1
    assert len(index) == 9


def test_duplicate_keys_are_refused_without_partial_adds(vectors):
    index = filled(vectors[:10])
    with pytest.raises(DuplicateKeyError, match="use update.*item-3"):
        index.add(["fresh", "item-3"], vectors[:2])
    with pytest.raises(DuplicateKeyError, match="twice"):
        index.add(["twice", "twice"], vectors[:2])
    assert len(index) == 10 and "fresh" not in index


def test_dimension_model_and_value_errors_are_clear(vectors, tmp_path):
    index = filled(vectors[:10])
    with pytest.raises(DimensionMismatchError, match=f"dimension {DIM}.*\\(2, 16\\)"):
        index.add(["a", "b"], np.ones((2, 16)))
    with pytest.raises(DimensionMismatchError):
        index.search(np.ones(DIM + 1), 3)
    with pytest.raises(ModelMismatchError, match="model-b.*model-a"):
        index.add(["a"], vectors[:1], model_id="model-b")
    with pytest.raises(ModelMismatchError):
        index.search(vectors[:1], 3, model_id="model-b")
    index.add(["a"], vectors[:1], model_id="model-a")
    index.save(tmp_path / "i.bin")
    with pytest.raises(ModelMismatchError, match="model-a.*model-b"):
        EmbeddingIndex.load(tmp_path / "i.bin", model_id="model-b")
    assert len(EmbeddingIndex.load(tmp_path / "i.bin", model_id="model-a")) == 11

    with pytest.raises(InvalidVectorError, match="zero"):
        index.add(["z"], np.zeros(DIM))
    with pytest.raises(InvalidVectorError, match="NaN"):
        index.add(["n"], np.full(DIM, np.nan))
    with pytest.raises(InvalidMetadataError, match="JSON"):
        index.add(["m"], vectors[:1], [{"x": object()}])
    with pytest.raises(TypeError, match="not one string"):
        index.add("abc", vectors[:3])
    assert len(index) == 11
    with pytest.raises(ValueError, match="IDMap"):
        EmbeddingIndex(DIM, "m", "IDMap,Flat")
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        EmbeddingIndex(DIM, "m", "IVF16,PQ5")  # 32 is not divisible into 5 sub-vectors


def test_ivf_trains_on_first_add_and_explains_too_few_vectors(vectors):
    index = EmbeddingIndex(DIM, "m", "IVF64,Flat")
    with pytest.raises(TrainingError, match="IVF64,Flat.*only 10 vectors"):
        index.add(keys_of(10), vectors[:10])
    assert len(index) == 0
    index.add(keys_of(2000), vectors)
    index.add(["late"], vectors[:1] + 0.01)  # trained: later adds may be tiny
    assert len(index) == 2001


def test_corrupt_files_are_refused_clearly(vectors, tmp_path):
    filled(vectors[:50]).save(tmp_path / "i.bin")
    data = (tmp_path / "i.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-100])
    with pytest.raises(CorruptIndexError, match="checksum"):
        EmbeddingIndex.load(tmp_path / "short.bin")
    (tmp_path / "other.bin").write_bytes(b"not an index at all")
    with pytest.raises(CorruptIndexError, match="not an embedding index"):
        EmbeddingIndex.load(tmp_path / "other.bin")


def test_concurrent_searches_during_writes(vectors):
    index = filled(vectors[:500])
    errors, stop = [], threading.Event()

    def search():
        try:
            while not stop.is_set():
                for hits in index.search(vectors[:20], 5):
                    assert len(hits) == 5 and hits[0].score >= hits[-1].score
        except Exception as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    readers = [threading.Thread(target=search) for _ in range(3)]
    for t in readers:
        t.start()
    for b in range(30):
        index.add(keys_of(50, 500 + 50 * b), vectors[500 + 50 * b : 550 + 50 * b])
        index.remove(keys_of(10, 500 + 50 * b))
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert len(index) == 500 + 30 * 40


CHILD = """
import sys, time
import numpy as np
from byorl.index.faiss_index import EmbeddingIndex
path = sys.argv[1]
index = EmbeddingIndex.load(path)
vectors = np.random.default_rng(int(sys.argv[2])).standard_normal((1000, index.dim))
for i in range(1000):
    index.add([f"{sys.argv[2]}-{i}"], vectors[i], [{"round": int(sys.argv[2])}])
    start = time.perf_counter()
    index.save(path)
    print(f"saved {time.perf_counter() - start:.4f}", flush=True)
"""


def test_a_save_killed_mid_write_leaves_a_loadable_index(tmp_path):
    """SIGKILL a process while it rewrites a 25 MB index: the file is always the old or the new."""
    path = tmp_path / "index.bin"
    rng = np.random.default_rng(0)
    base = EmbeddingIndex(64, "model-a")
    base.add(keys_of(100_000), rng.standard_normal((100_000, 64)))
    base.save(path)
    probe = base.get("item-123").vector
    expected, interrupted = len(base), 0
    for trial in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(trial)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        duration = float(child.stdout.readline().split()[1])  # one full save done
        if trial % 2:  # at a random moment of the save cycle
            time.sleep(random.uniform(0, duration))
        else:  # as soon as the temporary file is being written
            while not list(tmp_path.glob(".index.bin.tmp-*")):
                assert child.poll() is None
                time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        saves = 1 + len(child.stdout.read().splitlines())
        child.wait()
        leftovers = list(tmp_path.glob(".index.bin.tmp-*"))
        interrupted += bool(leftovers)
        for p in leftovers:
            p.unlink()

        index = EmbeddingIndex.load(path)
        added = len(index) - expected
        assert added in (saves, saves + 1)  # the save in flight happened wholly or not at all
        assert index.get(f"{trial}-{added - 1}").metadata == {"round": trial}
        assert f"{trial}-{added}" not in index
        assert index.search(probe, 1)[0][0].key == "item-123"
        expected = len(index)
    assert interrupted >= 1, "no kill landed while a temporary file was being written"
