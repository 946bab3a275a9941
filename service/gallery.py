"""Named galleries: an EmbeddingIndex each, plus the model-input pixels of every item.

    indexes/<name>/index.bin         the EmbeddingIndex (vectors, keys, metadata, model id)
    indexes/<name>/pixels-<gen>.u8   pixels at the model's input size, fixed-size records
    indexes/<name>/pixels.json       which record holds each key's pixels

The pixels let a linear head or an audit be run on items already in a gallery (robust heads
and attacks need pixels, not embeddings). An add appends its records (one fsync for the whole
request), then saves the map, then the index; a removal saves the index, then the map. So a
crash leaves at most unreferenced records, never a key without pixels, and every write is on
disk before it returns: an api restart loses nothing.
"""

import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

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


class PixelStore:
    """uint8 records appended to one file, and a key -> record map beside it. Records of removed
    keys are reclaimed by rewriting the file (under a new name) once they outnumber live ones."""

    def __init__(self, root: Path):
        self.root, self.map_path = root, root / "pixels.json"
        state = json.loads(self.map_path.read_text()) if self.map_path.exists() else {}
        self.file: str = state.get("file", "pixels-0.u8")
        self.shape: list[int] | None = state.get("shape")
        self.rows: dict[str, int] = state.get("rows", {})

    def _records(self) -> int:
        path = self.root / self.file
        return path.stat().st_size // int(np.prod(self.shape)) if path.exists() else 0

    def put(self, keys: list[str], pixels: np.ndarray) -> None:
        if self.shape is None:
            self.shape = list(pixels.shape[1:])
        start = self._records()
        with open(self.root / self.file, "ab") as f:
            f.write(np.ascontiguousarray(pixels, np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.rows.update({k: start + i for i, k in enumerate(keys)})
        self._save_map()

    def drop(self, keys: list[str]) -> None:
        for k in keys:
            self.rows.pop(k, None)
        self._save_map()
        if self._records() > 2 * len(self.rows) + 64:
            self._compact()

    def get(self, keys: list[str]) -> np.ndarray:
        data = np.memmap(self.root / self.file, np.uint8, "r").reshape(-1, *self.shape)
        return np.array(data[[self.rows[k] for k in keys]])

    def _save_map(self) -> None:
        state = {"file": self.file, "shape": self.shape, "rows": self.rows}
        atomic_write(self.map_path, [json.dumps(state).encode()])

    def _compact(self) -> None:
        keys, old = list(self.rows), self.file
        live = self.get(keys) if keys else np.empty((0, *self.shape), np.uint8)
        self.file = f"pixels-{int(old.split('-')[1].split('.')[0]) + 1}.u8"
        atomic_write(self.root / self.file, [live.tobytes()])
        self.rows = {k: i for i, k in enumerate(keys)}
        self._save_map()  # the switch to the new file
        (self.root / old).unlink(missing_ok=True)


class Gallery:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "indexes"
        self.root.mkdir(parents=True, exist_ok=True)
        names = sorted(p.parent.name for p in self.root.glob(f"*/{INDEX_FILE}"))
        self._indexes = {n: load_index(data_dir, n) for n in names}
        self._pixels = {n: PixelStore(self.root / n) for n in names}
        self._locks: dict[str, threading.Lock] = {n: threading.Lock() for n in names}
        self._lock = threading.Lock()  # guards the dicts

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
            self._pixels[name] = PixelStore(self.root / name)
        return index

    def delete(self, name: str) -> None:
        with self._lock:
            self.get(name)
            del self._indexes[name], self._locks[name], self._pixels[name]
            trash = self.root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
            (self.root / name).rename(trash)  # atomic: a restart never sees half an index
        shutil.rmtree(trash, ignore_errors=True)

    def add(self, name: str, keys: list[str], vectors: np.ndarray, pixels: np.ndarray,
            metadata: list[Any] | None, model_id: str) -> None:
        index = self.get(name)
        with self._locks[name]:
            new = [i for i, k in enumerate(keys) if k not in index]
            new_keys = [keys[i] for i in new]  # a key already present keeps its pixels
            self._pixels[name].put(new_keys, pixels[new])
            try:
                index.add(keys, vectors, metadata, model_id=model_id)
            except Exception:
                self._pixels[name].drop(new_keys)
                raise
            index.save(self.root / name / INDEX_FILE)

    def remove(self, name: str, keys: list[str]) -> int:
        index = self.get(name)
        with self._locks[name]:
            removed = index.remove(keys)
            index.save(self.root / name / INDEX_FILE)
            self._pixels[name].drop(keys)
        return removed

    def pixels(self, name: str, keys: list[str]) -> np.ndarray:
        """uint8 (N, 3, H, W) pixels of keys in the index (UnknownKeyError for the others)."""
        index = self.get(name)
        missing = [k for k in keys if k not in index]
        if missing:
            raise UnknownKeyError(f"keys not in index {name!r}: {missing[:5]}")
        with self._locks[name]:
            return self._pixels[name].get(keys)
