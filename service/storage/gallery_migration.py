"""Galleries of the previous format (rewritten whole per write) turned into GalleryStores.

    indexes/<name>/index.bin        an EmbeddingIndex file (vectors, keys, metadata)
    indexes/<name>/pixels-<gen>.u8  pixel records, and pixels.json: key -> record

The new store is built in a dot-folder, then its files are moved into the gallery's folder,
gallery.db last: a crash before that leaves the old format (migrated again at the next start,
the dot-folder removed), after it the new one (the old files are then removed).
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from byorl.files import fsync_dir
from byorl.index.faiss_index import EmbeddingIndex
from byorl.service.storage.gallery_store import (
    DB_FILE,
    ID_FILE,
    TRAINED_FILE,
    VECTOR_FILE,
    create_store,
)

OLD_INDEX_FILE = "index.bin"
CHUNK = 10_000  # items per transaction


def is_old_format(path: Path) -> bool:
    return (path / OLD_INDEX_FILE).exists() and not (path / DB_FILE).exists()


def migrate(path: Path) -> None:
    """Rewrite the old-format gallery at `path` as a GalleryStore, keeping every item."""
    old = EmbeddingIndex.load(path / OLD_INDEX_FILE)
    pixel_map = path / "pixels.json"
    state = json.loads(pixel_map.read_text()) if pixel_map.exists() else {"rows": {}}
    tmp = path.with_name(f".migrating-{path.name}-{uuid.uuid4().hex[:8]}")
    store = create_store(tmp, old.dim, old.model_id, old.factory)
    keys = old.keys()
    if keys:
        records = np.memmap(path / state["file"], np.uint8, "r").reshape(-1, *state["shape"])
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start : start + CHUNK]
            items = [old.get(k) for k in chunk]
            store.add(chunk, np.stack([i.vector for i in items]),
                      records[[state["rows"][k] for k in chunk]], [i.metadata for i in items],
                      old.model_id)
    store.close()
    for name in (VECTOR_FILE, ID_FILE, TRAINED_FILE, DB_FILE):  # the database last: the switch
        if (tmp / name).exists():
            os.replace(tmp / name, path / name)
    fsync_dir(path)
    for leftover in [path / OLD_INDEX_FILE, pixel_map, *path.glob("pixels-*.u8")]:
        leftover.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
