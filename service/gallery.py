"""Named galleries: an EmbeddingIndex each, plus the model-input pixels of every item.

    indexes/<name>/index.bin          the EmbeddingIndex (vectors, keys, metadata, model id)
    indexes/<name>/pixels/<hash>.png  the item's pixels at the model's input size

The pixels let a linear head or an audit be run on items already in a gallery (robust heads
and attacks need pixels, not embeddings). Adds write pixels before the index and removals
delete them after it, so a crash leaves at most an unreferenced pixel file, never a key
without pixels. Every write saves the index file before returning: an api restart loses nothing.
"""

import hashlib
import io
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from index.faiss_index import EmbeddingIndex, UnknownKeyError
from index.files import atomic_write
from service.store import Conflict, NotFound, check_name

INDEX_FILE = "index.bin"


def load_index(data_dir: str | Path, name: str) -> EmbeddingIndex:
    """One saved index, read from its file (what a worker sees of the api's galleries)."""
    path = Path(data_dir) / "indexes" / check_name(name, "index") / INDEX_FILE
    if not path.exists():
        raise NotFound("index", name)
    return EmbeddingIndex.load(path)


def _pixel_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest() + ".png"


class Gallery:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "indexes"
        self.root.mkdir(parents=True, exist_ok=True)
        self._indexes = {
            p.parent.name: load_index(data_dir, p.parent.name)
            for p in sorted(self.root.glob(f"*/{INDEX_FILE}"))
        }
        self._locks: dict[str, threading.Lock] = {n: threading.Lock() for n in self._indexes}
        self._lock = threading.Lock()  # guards the two dicts

    def names(self) -> list[str]:
        return sorted(self._indexes)

    def get(self, name: str) -> EmbeddingIndex:
        try:
            return self._indexes[name]
        except KeyError:
            raise NotFound("index", name) from None

    def create(self, name: str, dim: int, model_id: str, factory: str = "Flat") -> EmbeddingIndex:
        check_name(name, "index")
        with self._lock:
            if name in self._indexes:
                raise Conflict(f"index {name!r} already exists")
            index = EmbeddingIndex(dim, model_id, factory)
            index.save(self.root / name / INDEX_FILE)
            self._indexes[name], self._locks[name] = index, threading.Lock()
        return index

    def delete(self, name: str) -> None:
        with self._lock:
            self.get(name)
            del self._indexes[name], self._locks[name]
            trash = self.root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
            (self.root / name).rename(trash)  # atomic: a restart never sees half an index
        shutil.rmtree(trash, ignore_errors=True)

    def add(self, name: str, keys: list[str], vectors: np.ndarray, pixels: np.ndarray,
            metadata: list[Any] | None, model_id: str) -> None:
        index = self.get(name)
        with self._locks[name]:
            missing = [k for k in keys if k not in index]
            for key, px in zip(keys, pixels, strict=True):
                if key in missing:  # never overwrite the pixels of a key already present
                    buf = io.BytesIO()
                    Image.fromarray(px.transpose(1, 2, 0)).save(buf, format="PNG")
                    atomic_write(self._pixel_dir(name) / _pixel_name(key), [buf.getvalue()])
            index.add(keys, vectors, metadata, model_id=model_id)
            index.save(self.root / name / INDEX_FILE)

    def remove(self, name: str, keys: list[str]) -> int:
        index = self.get(name)
        with self._locks[name]:
            removed = index.remove(keys)
            index.save(self.root / name / INDEX_FILE)
            for key in keys:
                (self._pixel_dir(name) / _pixel_name(key)).unlink(missing_ok=True)
        return removed

    def pixels(self, name: str, keys: list[str]) -> np.ndarray:
        """uint8 (N, 3, H, W) pixels of keys in the index (UnknownKeyError for the others)."""
        index = self.get(name)
        missing = [k for k in keys if k not in index]
        if missing:
            raise UnknownKeyError(f"keys not in index {name!r}: {missing[:5]}")
        out = []
        for key in keys:
            with Image.open(self._pixel_dir(name) / _pixel_name(key)) as im:
                out.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
        return np.stack(out)

    def _pixel_dir(self, name: str) -> Path:
        return self.root / name / "pixels"
