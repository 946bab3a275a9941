"""The two homes of galleries behind one interface, chosen by the settings:

- embedded (default): `Galleries`, FAISS + SQLite in the data directory, one api process;
- Milvus (`BYORL_MILVUS_URI`): `MilvusGalleries`, collections on a Milvus server with their
  catalog and keys in the service's database, shared by every api replica and worker.

The api and the jobs use only `GalleryBackend`; `get` returns a handle with the gallery's
`model_id`, `dim`, `factory`, `len()` and `page()` (an EmbeddingIndex, or a MilvusGallery).
"""

from typing import Any, Protocol

import numpy as np

from byorl.index.faiss_index import Hit
from byorl.service.settings import Settings
from byorl.service.storage.gallery_store import ExportPage


class GalleryBackend(Protocol):
    def names(self) -> list[str]: ...
    def indexes(self) -> list[tuple[str, Any]]: ...
    def get(self, name: str) -> Any: ...
    def create(self, name: str, dim: int, model_id: str, factory: str | None = None) -> Any: ...
    def delete(self, name: str) -> None: ...
    def add(self, name: str, keys: list[str], vectors: np.ndarray, pixels: np.ndarray,
            metadata: list[Any] | None, model_id: str) -> None: ...
    def add_vectors(self, name: str, keys: list[str], vectors: bytes, pixels: bytes,
                    metadata: list[Any] | None, model_id: str, pixel_shape: tuple[int, ...],
                    limit: int) -> None: ...
    def remove(self, name: str, keys: list[str]) -> int: ...
    def pixels(self, name: str, keys: list[str]) -> np.ndarray: ...
    def export_page(self, name: str, offset: int, limit: int, max_bytes: int) -> ExportPage: ...
    def search(self, name: str, queries, k: int = 10, *, consistency: str | None = None,
               **options) -> list[list[Hit]]: ...
    def close(self) -> None: ...


def open_galleries(settings: Settings) -> GalleryBackend:
    """The galleries the settings name (the api's, for its lifetime)."""
    if settings.milvus_uri:
        from byorl.service.storage.milvus_galleries import MilvusGalleries

        return MilvusGalleries(settings)
    from byorl.service.storage.galleries import Galleries

    return Galleries(settings.data_dir)


def read_gallery(settings: Settings, name: str) -> tuple[list[str], np.ndarray, list[Any]]:
    """(keys in insertion order, their stored vectors, their metadata) of one gallery, wherever
    it lives: what a job (a retrieval audit, on any machine with the settings) reads."""
    if settings.milvus_uri:
        from byorl.service.storage.milvus_galleries import MilvusGalleries

        galleries = MilvusGalleries(settings)
        try:
            return galleries.vectors(name)
        finally:
            galleries.close()
    from byorl.service.storage.galleries import load_index

    index = load_index(settings.data_dir, name)
    keys = index.keys()
    items = [index.get(k) for k in keys]
    vectors = np.stack([i.vector for i in items]) if items else np.empty((0, index.dim),
                                                                         np.float32)
    return keys, vectors, [i.metadata for i in items]
