"""A gallery of the previous format (index.bin, pixels.json, pixels-1.u8) is migrated at start-up
with every item, and a migration interrupted before its switch is done again."""

import json

import numpy as np

from byorl.index.faiss_index import EmbeddingIndex
from byorl.service.storage.galleries import Galleries
from byorl.service.storage.gallery_store import create_store


def old_gallery(root, n: int = 30) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What the previous service.galleries wrote: removed items leave records behind."""
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(n)]
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    pixels = rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)
    index = EmbeddingIndex(8, "m")
    index.add(keys, vectors, [{"i": i} for i in range(n)])
    index.remove(keys[:5])
    root.mkdir(parents=True)
    index.save(root / "index.bin")
    (root / "pixels-1.u8").write_bytes(pixels[::-1].tobytes())  # records in another order
    rows = {k: n - 1 - i for i, k in enumerate(keys[5:], 5)}
    (root / "pixels.json").write_text(json.dumps({"file": "pixels-1.u8", "shape": [3, 4, 4],
                                                  "rows": rows}))
    return keys[5:], vectors[5:], pixels[5:]


def test_an_old_gallery_is_migrated_with_every_item(tmp_path):
    keys, vectors, pixels = old_gallery(tmp_path / "indexes" / "g")
    g = Galleries(tmp_path)
    index = g.get("g")
    assert index.keys() == keys and index.model_id == "m"
    np.testing.assert_array_equal(g.pixels("g", keys), pixels)
    assert [index.get(k).metadata for k in keys] == [{"i": i} for i in range(5, 30)]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack([index.get(k).vector for k in keys]), unit, rtol=1e-6)
    g.close()
    assert sorted(p.name for p in (tmp_path / "indexes" / "g").iterdir()) == \
        ["gallery.db", "vector-ids.i64", "vectors.f32"]
    assert Galleries(tmp_path).get("g").keys() == keys


def test_a_migration_killed_before_its_switch_is_done_again(tmp_path):
    """What a SIGKILL before the database is moved leaves: the old files, the half-built store
    in its dot-folder, vector files already moved. The next start migrates again."""
    root = tmp_path / "indexes" / "g"
    keys, _, pixels = old_gallery(root)
    create_store(tmp_path / "indexes" / ".migrating-g-0123abcd", 8, "m", "Flat").close()
    for name in ("vectors.f32", "vector-ids.i64"):
        (root / name).write_bytes(b"\x07" * 100)
    g = Galleries(tmp_path)
    assert g.get("g").keys() == keys
    np.testing.assert_array_equal(g.pixels("g", keys), pixels)
    assert [p.name for p in (tmp_path / "indexes").iterdir()] == ["g"]
