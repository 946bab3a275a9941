"""Named galleries: a GalleryStore each (service/gallery_store.py), under data/indexes/<name>/.

Each item keeps the model-input pixels it was embedded from, so that a linear head or an audit
can be run on items already in a gallery (robust heads and attacks need pixels, not
embeddings). A background thread checkpoints every gallery (vector file, SQLite WAL) once per
`checkpoint_s`. Creating and deleting go through dot-folders renamed atomically; start-up
removes the dot-folders that a crash left behind, and migrates galleries of the previous
format (service/gallery_migration.py).
"""

import logging
import math
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from byorl.index.faiss_index import EmbeddingIndex, Hit
from byorl.service.exceptions import Conflict, Invalid, NotFound, TooLarge
from byorl.service.names import NAME, check_name
from byorl.service.settings import Settings
from byorl.service.storage.gallery_migration import is_old_format, migrate
from byorl.service.storage.gallery_store import (
    DB_FILE,
    ExportPage,
    GalleryStore,
    create_store,
)

log = logging.getLogger(__name__)
CHECKPOINT_S = 1.0

# The factory parts a gallery may use (comma-separated), each number bounded by a setting:
# FAISS allocates what the numbers say (IVF10000000: 1.5 GB of centroids, PQ8x20: 1 GB of
# codebooks) at creation and again at every start.
FACTORY_PARTS = re.compile(r"Flat|SQ(?:4|6|8|fp16)|IVF(?P<lists>\d+)|HNSW(?P<degree>\d+)"
                           r"|PQ(?P<pq>\d+)(?:x(?P<bits>\d+))?")
FACTORY_SHAPES = "Flat, HNSW<degree>, PQ<m>x<bits>, IVF<lists>,Flat|SQ8|PQ<m>x<bits>"


def check_factory(factory: str, settings: Settings) -> None:
    """Refuse (422) a factory string outside the allowed parts, or whose list count, PQ code
    bits or graph degree pass their settings (FAISS then checks how the parts combine)."""
    bounds = {"lists": ("IVF lists", settings.max_factory_lists, "MAX_FACTORY_LISTS"),
              "degree": ("HNSW degree", settings.max_factory_graph_degree,
                         "MAX_FACTORY_GRAPH_DEGREE"),
              "bits": ("PQ bits per code", settings.max_factory_pq_bits, "MAX_FACTORY_PQ_BITS")}
    for part in factory.split(","):
        match = FACTORY_PARTS.fullmatch(part)
        if match is None:
            raise Invalid("invalid_factory", f"factory {factory[:100]!r}: part {part[:50]!r} is "
                          f"not allowed; the allowed shapes are {FACTORY_SHAPES}")
        for group, (what, limit, setting) in bounds.items():
            if match[group] is not None and not 1 <= int(match[group]) <= limit:
                raise Invalid("factory_out_of_bounds", f"factory {factory[:100]!r}: {what} "
                              f"{int(match[group])} is outside 1..{limit} ({setting})")


def decode_export(keys: list[str], vectors: bytes, pixels: bytes, dim: int,
                  pixel_shape: tuple[int, ...], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, pixels) of an export's items, their sizes checked (Invalid, TooLarge)."""
    n = len(keys)
    if n > limit:
        raise TooLarge("too_many_items", f"{n} items in one request; the limit is {limit}")
    if len(vectors) != n * dim * 4:
        raise Invalid("invalid_vectors", f"vectors hold {len(vectors)} bytes; {n} keys of "
                      f"dimension {dim} need {n * dim * 4} (float32, little-endian)")
    row = math.prod(pixel_shape)
    if len(pixels) != n * row:
        raise Invalid("invalid_pixels", f"pixels hold {len(pixels)} bytes; {n} keys of "
                      f"shape {list(pixel_shape)} need {n * row} (uint8)")
    return (np.frombuffer(vectors, "<f4").reshape(n, dim),
            np.frombuffer(pixels, np.uint8).reshape(n, *pixel_shape))


def load_index(data_dir: str | Path, name: str) -> EmbeddingIndex:
    """One gallery's index, read from disk (what a worker sees of the api's galleries)."""
    store = GalleryStore(Path(data_dir) / "indexes" / check_name(name, "index"), writable=False)
    store.close()
    return store.index


def remove_leftovers(root: Path) -> None:
    """Delete the dot-folders of creations and deletions that a crash interrupted (gallery
    names never start with a dot)."""
    for path in root.iterdir():
        if path.name.startswith(".") and path.is_dir():
            log.warning("removing %s, left by an interrupted create or delete", path)
            shutil.rmtree(path, ignore_errors=True)


class Galleries:
    def __init__(self, data_dir: Path, checkpoint_s: float = CHECKPOINT_S):
        self.root = Path(data_dir) / "indexes"
        self.root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.root)
        self._stores: dict[str, GalleryStore] = {}
        for path in sorted(self.root.iterdir()):
            if not NAME.match(path.name):
                continue
            if is_old_format(path):
                log.warning("migrating %s from the previous format", path)
                migrate(path)
            if (path / DB_FILE).exists():
                self._stores[path.name] = GalleryStore(path)
        self._lock = threading.Lock()  # guards the dict
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._checkpoints, args=(checkpoint_s,),
                                        name="gallery-checkpoints", daemon=True)
        self._thread.start()

    def names(self) -> list[str]:
        return sorted(self._stores)

    def indexes(self) -> list[tuple[str, EmbeddingIndex]]:
        """(name, index) of every gallery at one instant (a listing races deletes)."""
        return sorted((name, store.index) for name, store in list(self._stores.items()))

    def store(self, name: str) -> GalleryStore:
        try:
            return self._stores[name]
        except KeyError:
            raise NotFound("index", name) from None

    def get(self, name: str) -> EmbeddingIndex:
        return self.store(name).index

    def create(self, name: str, dim: int, model_id: str, factory: str | None = None
               ) -> EmbeddingIndex:
        check_name(name, "index")
        factory = factory or "Flat"
        with self._lock:
            if name in self._stores or (self.root / name).exists():
                raise Conflict(f"index {name!r} already exists")
            self._stores[name] = create_store(self.root / name, dim, model_id, factory)
            return self._stores[name].index

    def delete(self, name: str) -> None:
        """Waits for the write in flight; writes that come later answer NotFound."""
        with self._lock:
            store = self.store(name)
            del self._stores[name]
            store.close(checkpoint=False)
            trash = self.root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
            (self.root / name).rename(trash)  # atomic: a restart never sees half a gallery
        shutil.rmtree(trash, ignore_errors=True)

    def add(self, name: str, keys: list[str], vectors: np.ndarray, pixels: np.ndarray,
            metadata: list[Any] | None, model_id: str) -> None:
        self.store(name).add(keys, vectors, pixels, metadata, model_id)

    def add_vectors(self, name: str, keys: list[str], vectors: bytes, pixels: bytes,
                    metadata: list[Any] | None, model_id: str, pixel_shape: tuple[int, ...],
                    limit: int) -> None:
        """Store items from their vectors and pixels as an export holds them (no embedding):
        `vectors` little-endian float32 rows of the gallery's dimension, `pixels` uint8 rows of
        `pixel_shape` (the model's input), at most `limit` items; all or nothing, as `add`."""
        store = self.store(name)
        v, p = decode_export(keys, vectors, pixels, store.index.dim, pixel_shape, limit)
        store.add(keys, v, p, metadata, model_id)

    def search(self, name: str, queries, k: int = 10, *, consistency: str | None = None,
               **options) -> list[list[Hit]]:
        """EmbeddingIndex.search of the gallery; `consistency` is for other back-ends: a
        gallery in this process always sees every write that was answered."""
        return self.get(name).search(queries, k, **options)

    def export_page(self, name: str, offset: int, limit: int, max_bytes: int) -> ExportPage:
        """A page of items with their vectors and pixels (GalleryStore.export_page)."""
        return self.store(name).export_page(offset, limit, max_bytes)

    def remove(self, name: str, keys: list[str]) -> int:
        return self.store(name).remove(keys)

    def pixels(self, name: str, keys: list[str]) -> np.ndarray:
        """uint8 (N, 3, H, W) pixels of keys in the index (UnknownKeyError for the others)."""
        return self.store(name).pixels(keys)

    def close(self) -> None:
        """Stop checkpointing, checkpoint and close every gallery."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            for store in self._stores.values():
                store.close()

    def _checkpoints(self, every: float) -> None:
        while not self._stop.wait(every):
            for store in list(self._stores.values()):
                try:
                    store.checkpoint()
                except Exception:  # logged; the next round tries again
                    log.exception("checkpoint of gallery %s failed", store.name)
