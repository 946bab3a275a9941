import threading
import time

import numpy as np
import pytest

from byorl.index.faiss_index import DuplicateKeyError, ModelMismatchError, UnknownKeyError
from byorl.service.exceptions import Conflict, Invalid, NotFound, TooLarge
from byorl.service.settings import Settings
from byorl.service.storage.galleries import Galleries, check_factory, load_index


def items(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [f"s{seed}-{i}" for i in range(n)]
    return keys, rng.normal(size=(n, 8)).astype(np.float32), \
        rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)


def test_pixels_and_vectors_persist_exactly(tmp_path):
    g = Galleries(tmp_path)
    g.create("g", 8, "m")
    keys, vectors, pixels = items(10)
    g.add("g", keys, vectors, pixels, [{"i": i} for i in range(10)], "m")
    again = Galleries(tmp_path)  # what a restarted api sees
    np.testing.assert_array_equal(again.pixels("g", keys[::-1]), pixels[::-1])
    assert again.get("g").get(keys[3]).metadata == {"i": 3}
    assert load_index(tmp_path, "g").keys() == keys  # and a worker
    with pytest.raises(Conflict):
        again.create("g", 8, "m")


def test_a_refused_add_changes_nothing(tmp_path):
    g = Galleries(tmp_path)
    g.create("g", 8, "m")
    keys, vectors, pixels = items(4)
    g.add("g", keys, vectors, pixels, None, "m")
    other_keys, other_vectors, other_pixels = items(2, seed=1)
    with pytest.raises(DuplicateKeyError):  # one new key, one already present
        g.add("g", [other_keys[0], keys[1]], other_vectors, other_pixels, None, "m")
    with pytest.raises(UnknownKeyError):
        g.pixels("g", [other_keys[0]])
    np.testing.assert_array_equal(Galleries(tmp_path).pixels("g", keys), pixels)
    assert len(Galleries(tmp_path).get("g")) == 4


def test_removed_items_are_gone_after_a_restart(tmp_path):
    g = Galleries(tmp_path)
    g.create("g", 8, "m")
    keys, vectors, pixels = items(200)
    g.add("g", keys, vectors, pixels, None, "m")
    assert g.remove("g", keys[:150]) == 150
    g.close()
    again = Galleries(tmp_path)
    np.testing.assert_array_equal(again.pixels("g", keys[150:]), pixels[150:])
    assert again.get("g").keys() == keys[150:]
    with pytest.raises(UnknownKeyError):
        again.pixels("g", keys[:1])


def test_delete_index(tmp_path):
    g = Galleries(tmp_path)
    g.create("g", 8, "m")
    g.delete("g")
    assert g.names() == [] and Galleries(tmp_path).names() == []
    with pytest.raises(NotFound):
        g.get("g")


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


def test_an_export_page_adds_to_another_data_directory_as_it_was(tmp_path):
    src = Galleries(tmp_path / "a")
    src.create("g", 8, "m")
    keys, vectors, pixels = items(6)
    src.add("g", keys, vectors, pixels, [{"i": i} for i in range(6)], "m")
    page = src.export_page("g", 0, 100, 10**6)
    dst = Galleries(tmp_path / "b")
    dst.create("h", 8, "m")
    dst.add_vectors("h", page.keys, page.vectors.tobytes(), page.pixels.tobytes(),
                    [{"i": i} for i in range(6)], "m", (3, 4, 4), limit=10)
    again = Galleries(tmp_path / "b").export_page("h", 0, 100, 10**6)
    assert again.keys == keys and again.metadata == page.metadata
    np.testing.assert_array_equal(again.pixels, pixels)
    np.testing.assert_allclose(again.vectors, page.vectors, rtol=1e-6)
    q = page.vectors[:2]
    assert [[(h.key, round(h.score, 5)) for h in row] for row in src.get("g").search(q, 3)] == \
        [[(h.key, round(h.score, 5)) for h in row] for row in dst.get("h").search(q, 3)]


def test_add_vectors_refuses_wrong_sizes_and_counts_whole(tmp_path):
    g = Galleries(tmp_path)
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
