import numpy as np
import pytest

from index.faiss_index import DuplicateKeyError, UnknownKeyError
from service.gallery import Gallery, load_index
from service.store import Conflict, NotFound


def items(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [f"s{seed}-{i}" for i in range(n)]
    return keys, rng.normal(size=(n, 8)).astype(np.float32), \
        rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)


def test_pixels_and_vectors_persist_exactly(tmp_path):
    g = Gallery(tmp_path)
    g.create("g", 8, "m")
    keys, vectors, pixels = items(10)
    g.add("g", keys, vectors, pixels, [{"i": i} for i in range(10)], "m")
    again = Gallery(tmp_path)  # what a restarted api sees
    np.testing.assert_array_equal(again.pixels("g", keys[::-1]), pixels[::-1])
    assert again.get("g").get(keys[3]).metadata == {"i": 3}
    assert load_index(tmp_path, "g").keys() == keys  # and a worker
    with pytest.raises(Conflict):
        again.create("g", 8, "m")


def test_a_refused_add_changes_nothing(tmp_path):
    g = Gallery(tmp_path)
    g.create("g", 8, "m")
    keys, vectors, pixels = items(4)
    g.add("g", keys, vectors, pixels, None, "m")
    other_keys, other_vectors, other_pixels = items(2, seed=1)
    with pytest.raises(DuplicateKeyError):  # one new key, one already present
        g.add("g", [other_keys[0], keys[1]], other_vectors, other_pixels, None, "m")
    with pytest.raises(UnknownKeyError):
        g.pixels("g", [other_keys[0]])
    np.testing.assert_array_equal(Gallery(tmp_path).pixels("g", keys), pixels)
    assert len(Gallery(tmp_path).get("g")) == 4


def test_removal_reclaims_space_and_keeps_the_rest(tmp_path):
    g = Gallery(tmp_path)
    g.create("g", 8, "m")
    keys, vectors, pixels = items(200)
    g.add("g", keys, vectors, pixels, None, "m")
    assert g.remove("g", keys[:150]) == 150
    files = list((tmp_path / "indexes" / "g").glob("pixels-*.u8"))
    assert [f.name for f in files] == ["pixels-1.u8"]  # compacted into a new file
    assert files[0].stat().st_size == 50 * pixels[0].nbytes
    np.testing.assert_array_equal(Gallery(tmp_path).pixels("g", keys[150:]), pixels[150:])
    with pytest.raises(UnknownKeyError):
        g.pixels("g", keys[:1])


def test_delete_index(tmp_path):
    g = Gallery(tmp_path)
    g.create("g", 8, "m")
    g.delete("g")
    assert g.names() == [] and Gallery(tmp_path).names() == []
    with pytest.raises(NotFound):
        g.get("g")
