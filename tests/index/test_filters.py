"""Metadata filters of EmbeddingIndex.search: the k hits are the k most similar among the
matching items (never top-k, then filtered), with JSON equality."""

import numpy as np
import pytest

from byorl.index import faiss_index
from byorl.index.faiss_index import (
    EmbeddingIndex,
    FilterTooLargeError,
    InvalidFilterError,
    parse_filter,
)

DIM = 32
SOURCES = ["web", "scan", "phone"]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2000, DIM)).astype(np.float32)


def meta_of(i: int) -> dict:
    return {"source": SOURCES[i % 3], "label": i % 10, "id": i}


def build(vectors: np.ndarray, factory: str = "Flat") -> EmbeddingIndex:
    index = EmbeddingIndex(DIM, "m", factory, nprobe=16, ef_search=128)
    n = len(vectors)
    index.add([f"k{i}" for i in range(n)], vectors, [meta_of(i) for i in range(n)])
    return index


def brute_force(vectors, queries, mask, k, normalise=True):
    """(keys, scores) per query: cosine over the items where mask holds, best first (inner
    products with the vectors as they are, without `normalise`)."""
    cosine = unit(queries) @ (unit(vectors) if normalise else vectors).T
    cosine[:, ~mask] = -np.inf
    out = []
    for row in cosine:
        order = [i for i in np.argsort(-row, kind="stable")[:k] if np.isfinite(row[i])]
        out.append(([f"k{i}" for i in order], row[order]))
    return out


@pytest.fixture(params=["exact", "exact-chunked", "selector"])
def path(request, monkeypatch):
    """The three ways a filtered search runs: numpy over the matches (one chunk or several),
    or FAISS with an ID selector."""
    if request.param == "exact-chunked":
        monkeypatch.setattr(faiss_index, "EXACT_CHUNK", 7)
    if request.param == "selector":
        monkeypatch.setattr(faiss_index, "MAX_EXACT_FILTERED", 0)
    return request.param


def test_filtered_flat_search_equals_brute_force_over_the_matching_items(vectors, path):
    data = vectors[:600]
    index = build(data)
    queries = np.random.default_rng(1).standard_normal((8, DIM)) * 3
    idx = np.arange(len(data))
    cases = [
        ({"source": "web"}, idx % 3 == 0),
        ({"label": {"in": [1, 2, 7]}}, np.isin(idx % 10, [1, 2, 7])),
        ({"source": "scan", "label": {"in": [1, 4]}}, (idx % 3 == 1) & np.isin(idx % 10, [1, 4])),
        ({"source": {"in": ["web", "phone"]}, "label": 5}, (idx % 3 != 1) & (idx % 10 == 5)),
    ]
    for spec, mask in cases:
        got = index.search(queries, 10, filter=spec)
        for hits, (keys, scores) in zip(got, brute_force(data, queries, mask, 10), strict=True):
            assert [h.key for h in hits] == keys, spec
            np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
            assert all(h.metadata == meta_of(int(h.key[1:])) for h in hits)
    # Top-k-then-filter would miss: the unfiltered top 10 of a query hold few "label 3" items.
    spec = {"label": 3}
    hits = index.search(queries, 10, filter=spec)
    assert all(len(row) == 10 and all(h.metadata["label"] == 3 for h in row) for row in hits)


def test_fewer_matches_than_k_no_match_and_k_beyond_the_matches(vectors, path):
    index = build(vectors[:300])
    few = index.search(vectors[:3], 50, filter={"id": {"in": [5, 17, 250, 9999]}})
    assert [sorted(h.key for h in row) for row in few] == [["k17", "k250", "k5"]] * 3
    assert index.search(vectors[:2], 5, filter={"source": "fax"}) == [[], []]
    assert index.search(vectors[:2], 5, filter={"nope": 1}) == [[], []]
    assert index.search(vectors[:2], 5, filter={"label": {"in": []}}) == [[], []]
    assert index.search(vectors[:2], 5, filter={"source": "scan", "id": 0}) == [[], []]  # k0: web
    everything = index.search(vectors[0], 1000, filter={})[0]  # no condition: every item
    assert len(everything) == 300
    empty = EmbeddingIndex(DIM, "m")
    assert empty.search(vectors[:2], 5, filter={"source": "web"}) == [[], []]


def test_equality_is_json_equality(vectors):
    metadata = {"int": {"v": 1}, "float": {"v": 1.0}, "str": {"v": "1"}, "true": {"v": True},
                "false": {"v": False}, "zero": {"v": 0}, "null": {"v": None},
                "missing": {"w": 1}, "list": {"v": [1]}, "object": {"v": {"in": [1]}},
                "array-item": [{"v": 1}], "string-item": "v", "none-item": None}
    index = EmbeddingIndex(DIM, "m")
    index.add(list(metadata), vectors[:len(metadata)], list(metadata.values()))

    def found(spec) -> set[str]:
        return {h.key for h in index.search(vectors[0], 100, filter=spec)[0]}

    assert found({"v": 1}) == found({"v": 1.0}) == {"int", "float"}
    assert found({"v": "1"}) == {"str"}
    assert found({"v": True}) == {"true"}
    assert found({"v": False}) == {"false"}
    assert found({"v": 0}) == {"zero"}
    assert found({"v": None}) == {"null"}  # a missing field is not null
    assert found({"v": {"in": [1, "1", None]}}) == {"int", "float", "str", "null"}
    assert found({"v": {"in": [True, 0]}}) == {"true", "zero"}
    assert found({"w": 1}) == {"missing"}


def test_writes_keep_the_field_index_current(vectors, tmp_path):
    """The field index, built by the first filtered search, follows adds, removals and updates;
    a loaded index builds its own."""
    index = build(vectors[:300])
    web = {"source": "web"}
    before = {h.key for h in index.search(vectors[0], 300, filter=web)[0]}
    assert len(before) == 100
    index.remove([f"k{i}" for i in range(0, 300, 6)])  # half of the web items
    index.add(["new-web", "new-scan"], vectors[300:302], [{"source": "web"}, {"source": "scan"}])
    index.update("k3", metadata={"source": "scan"})  # k3 was web
    index.update("k1", metadata={"source": "web", "label": 99})  # k1 was scan
    index.update("k9", vector=vectors[400])  # a new vector keeps its metadata
    expected = {f"k{i}" for i in range(3, 300, 6)} - {"k3"} | {"new-web", "k1"}
    for _ in range(2):
        after = {h.key for h in index.search(vectors[0], 300, filter=web)[0]}
        assert after == expected
        hit = index.search(vectors[400], 1, filter={"source": "web", "label": 9})[0][0]
        assert hit.key == "k9" and hit.score == pytest.approx(1, abs=1e-5)
        assert index.search(vectors[0], 5, filter={"label": 99})[0][0].key == "k1"
        index.save(tmp_path / "index.bin")
        index = EmbeddingIndex.load(tmp_path / "index.bin")


@pytest.mark.parametrize("factory", ["HNSW16", "IVF16,Flat", "IVF16,PQ16", "PQ16", "SQ8"])
def test_approximate_types_honour_the_filter(vectors, factory, monkeypatch):
    """Every hit matches, on each path. Few matches are scored exactly (against the stored
    vectors: the FAISS-independent brute force over the reconstructions); IVF over all its lists
    with an ID selector is exact too."""
    index = build(vectors, factory)
    index.remove([f"k{i}" for i in range(0, 2000, 5)])  # tombstones (HNSW) or gone (IVF, PQ)
    queries = vectors[1000:1010]
    spec = {"source": {"in": ["web", "phone"]}, "label": {"in": [1, 2, 3, 4]}}
    idx = np.arange(2000)
    mask = (idx % 3 != 1) & np.isin(idx % 10, [1, 2, 3, 4]) & (idx % 5 != 0)
    stored = np.stack([index.get(f"k{i}").vector if mask[i] else np.ones(DIM, np.float32)
                       for i in range(2000)])
    exact = brute_force(stored, queries, mask, 10, normalise=False)
    for hits, (keys, scores) in zip(index.search(queries, 10, filter=spec), exact, strict=True):
        assert [h.key for h in hits] == keys
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-4)
    monkeypatch.setattr(faiss_index, "MAX_EXACT_FILTERED", 0)
    through_faiss = index.search(queries, 10, filter=spec)
    for row in through_faiss:
        assert len(row) == 10 and all(mask[int(h.key[1:])] for h in row)
    if factory == "IVF16,Flat":  # nprobe 16 = every list: exact
        assert [[h.key for h in row] for row in through_faiss] == [k for k, _ in exact]


def test_pq_types_search_after_a_removal(vectors):
    """IndexPQ takes no SearchParameters: a removal compacts it instead of a tombstone (a
    tombstone made every later search fail)."""
    index = build(vectors[:600], "PQ16")
    index.remove(["k3"])
    assert "k3" not in {h.key for h in index.search(vectors[3], 600)[0]}
    assert len(index.search(vectors[3], 600)[0]) == 599


@pytest.mark.parametrize("spec, message", [
    ([1], "a filter is a JSON object"),
    ({"a": [1, 2]}, "'a': a list is not a value; for membership write"),
    ({"a": {"eq": 1}}, "'a': an object condition is {\"in\": [values]}; unknown operator"),
    ({"a": {"in": [1], "nin": [2]}}, "unknown operator(s) ['nin']"),
    ({"a": {}}, "'a': an object condition is"),
    ({"a": {"in": 1}}, "\"in\" takes a list of JSON scalars, got int"),
    ({"a": {"in": [[1]]}}, "'a': values are JSON scalars"),
    ({"a": {"in": [{"b": 1}]}}, "values are JSON scalars (string, number, true, false, null), "
                                "got dict"),
    ({"a": float("nan")}, "nan is not a JSON number"),
    ({"": 1}, "non-empty strings"),
])
def test_invalid_filters_are_refused_naming_the_problem(vectors, spec, message):
    with pytest.raises(InvalidFilterError) as refused:
        parse_filter(spec)
    assert message in str(refused.value)
    with pytest.raises(InvalidFilterError):
        build(vectors[:3]).search(vectors[0], 1, filter=spec)


def test_filter_limits():
    spec = {"a": 1, "b": {"in": [1, 2, 3]}}
    assert parse_filter(spec, max_fields=2, max_values=4) is not None
    with pytest.raises(FilterTooLargeError, match="2 fields; the limit is 1"):
        parse_filter(spec, max_fields=1)
    with pytest.raises(FilterTooLargeError, match="more than 3 values.*the limit is 3"):
        parse_filter(spec, max_values=3)
