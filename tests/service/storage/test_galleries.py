"""The galleries' behaviour, run unchanged against each back-end (`backend`): embedded (FAISS +
SQLite in the data directory), and Milvus with its catalog in SQLite or in PostgreSQL. A second
`open()` is what another api replica (or a restarted one) sees. Tests of one back-end's own
mechanics follow them."""

import threading
import time

import numpy as np
import pytest

from byorl.index.faiss_index import (
    DimensionMismatchError,
    DuplicateKeyError,
    ModelMismatchError,
    UnknownKeyError,
)
from byorl.service.exceptions import Conflict, Invalid, NotFound, TooLarge
from byorl.service.settings import Settings
from byorl.service.storage.galleries import Galleries, check_factory
from byorl.service.storage.gallery_backends import read_gallery
from tests.conftest import fresh_database, milvus_settings


def items(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [f"s{seed}-{i}" for i in range(n)]
    return keys, rng.normal(size=(n, 8)).astype(np.float32), \
        rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)


class Backend:
    """Opens galleries on one back-end (`open()`: another replica, or a restart) and closes
    everything it opened (deleting what a Milvus test created)."""

    def __init__(self, kind: str, settings: Settings):
        self.kind, self.settings, self.opened = kind, settings, []

    def open(self):
        if self.kind == "embedded":
            g = Galleries(self.settings.data_dir)
        else:
            from byorl.service.storage.milvus_galleries import MilvusGalleries

            g = MilvusGalleries(self.settings)
        self.opened.append(g)
        return g

    def close(self):
        if self.kind != "embedded":
            g = self.open()
            for name in g.names():
                g.delete(name)
        for g in self.opened:
            g.close()


@pytest.fixture(params=["embedded", "milvus", "milvus-postgresql"])
def backend(request, tmp_path):
    if request.param == "embedded":
        b = Backend("embedded", Settings(data_dir=tmp_path))
    else:
        url = fresh_database(request.getfixturevalue("postgres")) \
            if request.param == "milvus-postgresql" else ""
        b = Backend(request.param, milvus_settings(request.getfixturevalue("milvus"), tmp_path,
                                                   url, milvus_consistency="strong"))
    yield b
    b.close()


def hits(rows):
    return [[(h.key, round(h.score, 5)) for h in row] for row in rows]


def test_pixels_vectors_and_metadata_are_seen_by_another_replica(backend):
    g = backend.open()
    g.create("g", 8, "m")
    keys, vectors, pixels = items(10)
    g.add("g", keys, vectors, pixels, [{"i": i} for i in range(10)], "m")
    again = backend.open()  # what a restarted api, or another replica, sees
    np.testing.assert_array_equal(again.pixels("g", keys[::-1]), pixels[::-1])
    assert again.get("g").page(3, 2) == (10, [(keys[3], {"i": 3}), (keys[4], {"i": 4})])
    assert again.get("g").page(9, 5, raw_metadata=True) == (10, [(keys[9], '{"i": 9}')])
    stored_keys, stored, metadata = read_gallery(backend.settings, "g")  # and a worker
    assert stored_keys == keys and metadata == [{"i": i} for i in range(10)]
    np.testing.assert_allclose(stored, vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                               rtol=1e-5)
    info = again.get("g")
    assert (info.model_id, info.dim, len(info)) == ("m", 8, 10)
    assert [name for name, _ in again.indexes()] == ["g"] == again.names()
    with pytest.raises(Conflict):
        again.create("g", 8, "m")


def test_a_refused_add_changes_nothing(backend):
    g = backend.open()
    g.create("g", 8, "m")
    keys, vectors, pixels = items(4)
    g.add("g", keys, vectors, pixels, None, "m")
    other_keys, other_vectors, other_pixels = items(2, seed=1)
    with pytest.raises(DuplicateKeyError):  # one new key, one already present
        g.add("g", [other_keys[0], keys[1]], other_vectors, other_pixels, None, "m")
    with pytest.raises(DuplicateKeyError):  # twice in one add
        g.add("g", [other_keys[0]] * 2, other_vectors, other_pixels, None, "m")
    with pytest.raises(ModelMismatchError):
        g.add("g", other_keys, other_vectors, other_pixels, None, "other")
    with pytest.raises(DimensionMismatchError):
        g.add("g", other_keys, other_vectors[:, :4], other_pixels, None, "m")
    with pytest.raises(UnknownKeyError):
        g.pixels("g", [other_keys[0]])
    np.testing.assert_array_equal(backend.open().pixels("g", keys), pixels)
    assert len(backend.open().get("g")) == 4
    # the duplicate never reached the vectors: a search finds each key once
    found = g.search("g", vectors[1], 10)[0]
    assert sorted(h.key for h in found) == sorted(keys)
    with pytest.raises(NotFound):
        g.add("nope", other_keys, other_vectors, other_pixels, None, "m")


def test_removed_items_are_gone_and_pages_keep_insertion_order(backend):
    g = backend.open()
    g.create("g", 8, "m")
    keys, vectors, pixels = items(200)
    order = keys[::-1]  # insertion order is not key order
    g.add("g", order[:120], vectors[:120], pixels[:120], None, "m")
    g.add("g", order[120:], vectors[120:], pixels[120:], None, "m")
    with pytest.raises(UnknownKeyError):  # all or nothing
        g.remove("g", [order[0], "unknown"])
    assert g.remove("g", order[:150]) == 150
    again = backend.open()
    np.testing.assert_array_equal(again.pixels("g", order[150:]), pixels[150:])
    assert again.get("g").page(0, 100) == (50, [(k, None) for k in order[150:]])
    assert again.get("g").page(40, 100)[1] == [(k, None) for k in order[190:]]
    assert again.get("g").page(1000, 10) == (50, [])
    assert {h.key for h in again.search("g", vectors[:150], 5)[0]} <= set(order[150:])
    with pytest.raises(UnknownKeyError):
        again.pixels("g", order[:1])
    g.add("g", order[:1], vectors[:1], pixels[:1], None, "m")  # a removed key may come back
    assert g.get("g").page(50, 1) == (51, [(order[0], None)])


ODD_KEYS = ["it's", "back\\slash", 'q"uote', "\\", "\\\"", "x]y", "\x01", "tab\t", "é\u2028😀"]


def test_keys_with_quotes_backslashes_and_control_characters_round_trip(backend):
    """Any key the API takes (any text but NUL) is stored, read, found, filtered on and removed
    (on Milvus a key reaches an expression: `'` and `\\` in a removed key were a 500, and a
    filter on a field named with non-ASCII characters found nothing)."""
    g = backend.open()
    g.create("g", 8, "m")
    keys, vectors, pixels = items(len(ODD_KEYS))
    g.add("g", ODD_KEYS, vectors, pixels, [{k: k} for k in ODD_KEYS], "m")
    np.testing.assert_array_equal(g.pixels("g", ODD_KEYS[::-1]), pixels[::-1])
    assert g.get("g").page(0, 100) == (len(ODD_KEYS), [(k, {k: k}) for k in ODD_KEYS])
    for i, key in enumerate(ODD_KEYS):
        found = g.search("g", vectors[i:i + 1], 1, filter={key: key})[0]
        assert [h.key for h in found] == [key]
    assert g.remove("g", ODD_KEYS[:5]) == 5
    assert g.remove("g", ODD_KEYS[5:6]) == 1
    with pytest.raises(UnknownKeyError):
        g.pixels("g", ODD_KEYS[:1])
    assert read_gallery(backend.settings, "g")[0] == ODD_KEYS[6:]


def test_search_finds_the_nearest_items_with_their_metadata(backend):
    g = backend.open()
    g.create("g", 8, "m")
    keys, vectors, pixels = items(50)
    g.add("g", keys, vectors, pixels, [{"i": i} for i in range(50)], "m")
    rows = g.search("g", vectors[[7, 21]], 3)
    assert [row[0].key for row in rows] == [keys[7], keys[21]]
    assert rows[0][0].metadata == {"i": 7} and abs(rows[0][0].score - 1) < 1e-5
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = np.argsort(-(unit[7] @ unit.T))[:3]
    assert [h.key for h in rows[0]] == [keys[i] for i in exact]
    assert [s.score for s in rows[0]] == sorted((s.score for s in rows[0]), reverse=True)
    assert g.search("g", vectors[0], 3, raw_metadata=True)[0][0].metadata == '{"i": 0}'
    assert len(g.search("g", vectors[0], 500)[0]) == 50  # fewer than k
    with pytest.raises(ModelMismatchError):
        g.search("g", vectors[0], 3, model_id="other")
    g.create("empty", 8, "m")
    assert g.search("empty", vectors[:2], 3) == [[], []]


METADATA = [{"label": 1}, {"label": 1.0}, {"label": "1"}, {"label": True}, {"label": None},
            {"label": 2, "source": "web"}, {"other": 1}, [1], "label", None,
            {"label": [1]}, {"label": {"a": 1}}, {"label": False}, {"label": 0},
            {"label": 2, "source": "scan"}, {'we"ird]': "x'y\"z\\"}]


FILTERS = [
    ({"label": 1}, [0, 1]),
    ({"label": 1.0}, [0, 1]),
    ({"label": "1"}, [2]),
    ({"label": True}, [3]),
    ({"label": False}, [12]),
    ({"label": 0}, [13]),
    ({"label": None}, [4]),
    ({"label": {"in": [1, "1", None]}}, [0, 1, 2, 4]),
    ({"label": {"in": [2.5, 2]}}, [5, 14]),
    ({"label": 2, "source": "web"}, [5]),
    ({"label": 2, "source": {"in": ["scan", "x"]}}, [14]),
    ({'we"ird]': "x'y\"z\\"}, [15]),
    ({"label": "nothing"}, []),
    ({}, list(range(16))),
]


def test_filtered_search_is_exact_with_json_equality(backend):
    """Only matching items are candidates, k taken after (1 == 1.0, never "1" or true)."""
    g = backend.open()
    g.create("g", 8, "m")
    keys = [f"k{i}" for i in range(len(METADATA))]
    vectors = np.random.default_rng(0).normal(size=(len(keys), 8)).astype(np.float32)
    g.add("g", keys, vectors, np.zeros((len(keys), 3, 4, 4), np.uint8), METADATA, "m")
    for spec, expected in FILTERS:
        found = g.search("g", vectors[[3, 9]], 100, filter=spec)
        assert [sorted(h.key for h in row) for row in found] == \
            [sorted(keys[i] for i in expected)] * 2, spec
        if len(expected) > 1:  # k is taken after filtering: the best 1 of the matching ones
            best = g.search("g", vectors[[3]], 1, filter=spec)[0]
            assert [h.key for h in best] == [found[0][0].key], spec


def test_delete_index(backend):
    g = backend.open()
    g.create("g", 8, "m")
    g.add("g", *items(3)[:1], *items(3)[1:], None, "m")
    g.delete("g")
    assert g.names() == [] and backend.open().names() == []
    for call in (lambda: g.get("g"), lambda: g.delete("g"), lambda: g.pixels("g", ["s0-0"]),
                 lambda: g.search("g", items(1)[1], 1), lambda: g.remove("g", ["s0-0"])):
        with pytest.raises(NotFound):
            call()
    g.create("g", 8, "m")  # the name is free again, and empty
    assert len(g.get("g")) == 0


def test_an_export_page_adds_to_another_gallery_as_it_was(backend):
    src = backend.open()
    src.create("g", 8, "m")
    keys, vectors, pixels = items(6)
    src.add("g", keys[::-1], vectors[::-1], pixels[::-1], [{"i": i} for i in range(6)], "m")
    page = src.export_page("g", 0, 100, 10**6)
    assert page.count == 6 and page.keys == keys[::-1] and page.pixel_shape == [3, 4, 4]
    assert page.metadata == [f'{{"i": {i}}}' for i in range(6)]
    dst = backend.open()
    dst.create("h", 8, "m")
    dst.add_vectors("h", page.keys, page.vectors.tobytes(), page.pixels.tobytes(),
                    [{"i": i} for i in range(6)], "m", (3, 4, 4), limit=10)
    again = backend.open().export_page("h", 0, 100, 10**6)
    assert again.keys == keys[::-1] and again.metadata == page.metadata
    np.testing.assert_array_equal(again.pixels, pixels[::-1])
    np.testing.assert_allclose(again.vectors, page.vectors, rtol=1e-6)
    q = page.vectors[:2]
    assert hits(src.search("g", q, 3)) == hits(dst.search("h", q, 3))
    # pages: offsets, and the byte limit (an item: 8 key + 8 metadata + 32 vector + 48 pixels)
    second = src.export_page("g", 4, 100, 10**6)
    assert second.keys == keys[::-1][4:] and second.offset == 4
    assert len(src.export_page("g", 0, 100, 250).keys) == 2
    with pytest.raises(TooLarge):
        src.export_page("g", 0, 100, 50)
    empty = src.export_page("g", 6, 100, 10**6)
    assert empty.keys == [] and empty.vectors.shape == (0, 8)


def test_add_vectors_refuses_wrong_sizes_and_counts_whole(backend):
    g = backend.open()
    g.create("g", 8, "m")
    keys, vectors, pixels = items(3)
    args = ("g", keys, vectors.tobytes(), pixels.tobytes(), None, "m", (3, 4, 4))
    with pytest.raises(Invalid, match="need 96") as bad:
        g.add_vectors("g", keys, vectors[:2].tobytes(), *args[3:], limit=10)
    assert bad.value.code == "invalid_vectors"
    with pytest.raises(Invalid) as bad:
        g.add_vectors(*args[:3], pixels[:, :2].tobytes(), *args[4:], limit=10)
    assert bad.value.code == "invalid_pixels"
    with pytest.raises(TooLarge) as over:
        g.add_vectors(*args, limit=2)
    assert over.value.code == "too_many_items"
    with pytest.raises(ModelMismatchError):
        g.add_vectors(*args[:5], "other", args[6], limit=10)
    assert len(g.get("g")) == 0
    with pytest.raises(NotFound):
        g.add_vectors("nope", *args[1:], limit=10)


def test_leftovers_of_interrupted_deletes_and_creates_are_removed_at_start_up(tmp_path):
    """A crash between a delete's rename and its removal (or inside a create) leaves a
    dot-folder: start-up ignores and removes it (issue 12, item 6)."""
    g = Galleries(tmp_path)
    g.create("g", 8, "m")
    g.add("g", *items(3)[:1], *items(3)[1:], None, "m")
    g.close()
    root = tmp_path / "indexes"
    (root / "g").rename(root / ".deleted-g-0123abcd")
    (root / ".creating-h-89abcdef").mkdir()
    (root / ".deleted-old-00000000").mkdir()
    (root / ".deleted-old-00000000" / "index.bin").write_bytes(b"BYORLIDX")  # older format
    again = Galleries(tmp_path)
    assert again.names() == [] and sorted(p.name for p in root.iterdir()) == []
    again.create("g", 8, "m")  # the name is free again


def test_adds_racing_a_delete_and_recreate_fail_only_with_not_found(tmp_path):
    """Clients add while another deletes and re-creates the gallery (issue 12, item 4): an
    add either lands in one incarnation of the gallery or finds it gone (404), nothing else."""
    g = Galleries(tmp_path, checkpoint_s=0.001)
    g.create("g", 8, "m")
    errors: list[Exception] = []
    stop = threading.Event()
    outcomes = {"added": 0, "gone": 0}

    def adder(seed: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            keys, vectors, pixels = items(2, seed=seed * 100_000 + i)
            try:
                g.add("g", keys, vectors, pixels, None, "m")
                g.pixels("g", keys)
                outcomes["added"] += 1
            except (NotFound, UnknownKeyError):  # deleted meanwhile (pixels: after the add)
                outcomes["gone"] += 1
            except Exception as e:  # noqa: BLE001 - reported to the main thread
                errors.append(e)

    threads = [threading.Thread(target=adder, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for _ in range(30):
        try:
            g.delete("g")
        except NotFound:
            pass
        time.sleep(0.005)
        g.create("g", 8, "m")
        time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert outcomes["added"] and outcomes["gone"]
    count = len(g.get("g"))
    g.close()
    assert len(Galleries(tmp_path).get("g")) == count


@pytest.mark.parametrize("factory,code,named", [
    ("IVF10000000,Flat", "factory_out_of_bounds", "MAX_FACTORY_LISTS"),
    ("IVF0,Flat", "factory_out_of_bounds", "MAX_FACTORY_LISTS"),
    ("PQ8x20", "factory_out_of_bounds", "MAX_FACTORY_PQ_BITS"),
    ("IVF64,PQ8x13", "factory_out_of_bounds", "MAX_FACTORY_PQ_BITS"),
    ("HNSW100000", "factory_out_of_bounds", "MAX_FACTORY_GRAPH_DEGREE"),
    ("IMI2x20,Flat", "invalid_factory", "allowed shapes"),
    ("OPQ8,IVF64,PQ8", "invalid_factory", "allowed shapes"),
])
def test_factory_strings_beyond_their_bounds_are_refused(factory, code, named):
    """FAISS allocates what the numbers say: IVF10000000 took 1.5 GB, PQ8x20 1 GB."""
    with pytest.raises(Invalid) as info:
        check_factory(factory, Settings())
    assert info.value.code == code and named in str(info.value)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF65536,Flat", "IVF256,PQ8x12",
                                     "IVF1024,SQ8", "PQ16", "HNSW128"])
def test_factory_strings_within_bounds_pass(factory):
    check_factory(factory, Settings())




def test_milvus_consistency_strong_reads_your_writes_and_bounded_catches_up(milvus, tmp_path):
    """Strong: an add answered through one replica is found at once by a search through
    another; Bounded (the default) may miss it for up to Milvus's gracefulTime (5 s), then
    finds it."""
    from byorl.service.storage.milvus_galleries import MilvusGalleries

    settings = milvus_settings(milvus, tmp_path)
    assert settings.milvus_consistency == "bounded"
    a, b = MilvusGalleries(settings), MilvusGalleries(settings)
    try:
        a.create("g", 8, "m")
        for round in range(3):
            keys, vectors, pixels = items(5, seed=round)
            a.add("g", keys, vectors, pixels, None, "m")
            found = b.search("g", vectors, 1, consistency="strong")
            assert [row[0].key for row in found] == keys
        keys, vectors, pixels = items(5, seed=9)
        a.add("g", keys, vectors, pixels, None, "m")
        deadline = time.monotonic() + 15
        while [row[0].key for row in b.search("g", vectors, 1) if row] != keys:
            assert time.monotonic() < deadline, "a bounded search never saw the add"
            time.sleep(0.5)
    finally:
        a.delete("g")
        a.close()
        b.close()
