"""One gallery on disk. An add or a removal is one SQLite transaction (one fsync) whatever the
gallery's size; opening reads a vector file that a background checkpoint keeps up to date.

    indexes/<name>/gallery.db     SQLite in WAL mode, synchronous=FULL: info (settings, pixel
                                  shape, trusted vector-file records), items (id, key, metadata),
                                  blobs (id, vector, pixels)
    indexes/<name>/vectors.f32    float32 vectors copied from blobs, row after row
    indexes/<name>/vector-ids.i64 the id of each row
    indexes/<name>/trained.faiss  IVF/PQ types: the trained, empty FAISS index (written once)

The database is the truth: an add is answered once its transaction is committed, so a SIGKILL
at any moment keeps every answered add and loses an unanswered one whole (SQLite rolls back an
uncommitted transaction). vectors.f32 only makes opening fast (reading a million vectors out of
SQLite takes ~15 s, out of the file ~1 s): its first `vector_rows` records were fsynced before
that count was committed; opening trusts those, matched by id against the live items, and reads
the items it lacks from the database. Removed items leave dead records in it until an opening
finds more dead records than live ones and rewrites it.
"""

import gc
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from byorl.files import atomic_write, fsync_dir
from byorl.index.faiss_index import CorruptIndexError, EmbeddingIndex, UnknownKeyError
from byorl.service.exceptions import NotFound, TooLarge

DB_FILE, TRAINED_FILE = "gallery.db", "trained.faiss"
VECTOR_FILE, ID_FILE = "vectors.f32", "vector-ids.i64"  # row i: the vector of id i
FORMAT = 2
SCHEMA = (
    "CREATE TABLE info (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # AUTOINCREMENT: the largest id ever used is remembered, so a removed item's id is never
    # given to another (the vector file may still hold its record).
    "CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, "
    "metadata TEXT)",
    "CREATE TABLE blobs (id INTEGER PRIMARY KEY, vector BLOB NOT NULL, pixels BLOB NOT NULL)",
)
IDS_PER_QUERY = 10_000  # ids in one "IN (...)" (SQLite allows 32766 variables)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Opening creates millions of objects (one row tuple per item) and keeps most of them: the
    cyclic collector would rescan them again and again (3x slower at 1M items, measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def connect(path: Path) -> sqlite3.Connection:
    """A connection to an existing database; commits are fsynced, the WAL is copied back into
    the database by `GalleryStore.checkpoint`, never by the commit of an add."""
    if not path.exists():
        raise FileNotFoundError(path)
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    return con


@contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def select_ids(con: sqlite3.Connection, sql: str, ids: Sequence[int]) -> Iterator[tuple]:
    """Rows of `sql` (one "{}" for the id list) for ids, queried in bounded chunks."""
    for start in range(0, len(ids), IDS_PER_QUERY):
        chunk = [int(i) for i in ids[start : start + IDS_PER_QUERY]]
        yield from con.execute(sql.format(",".join("?" * len(chunk))), chunk)


def create_store(root: Path, dim: int, model_id: str, factory: str) -> "GalleryStore":
    """An empty gallery at `root`, built in a dot-folder beside it and renamed into place: a
    crash leaves no half gallery (start-up removes the dot-folder)."""
    EmbeddingIndex(dim, model_id, factory)  # refuses an invalid factory before any file exists
    tmp = root.with_name(f".creating-{root.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    path = tmp / DB_FILE
    sqlite3.connect(path).close()
    con = connect(path)
    info = {"format": FORMAT, "dim": dim, "model_id": model_id, "factory": factory,
            "nprobe": 16, "ef_search": 64, "pixel_shape": None, "vector_rows": 0}
    with transaction(con):
        for statement in SCHEMA:
            con.execute(statement)
        con.executemany("INSERT INTO info VALUES (?, ?)",
                        [(k, json.dumps(v)) for k, v in info.items()])
    con.close()
    os.rename(tmp, root)
    fsync_dir(root.parent)
    return GalleryStore(root)


@dataclass(frozen=True)
class ExportPage:
    """Items offset.. of a gallery in insertion order, read at one instant, with everything a
    restore needs: keys, stored metadata (JSON text), normalised vectors and pixels."""

    count: int  # items in the whole gallery at that instant
    offset: int
    keys: list[str]
    metadata: list[str | None]
    vectors: np.ndarray  # float32 (n, dim)
    pixels: np.ndarray  # uint8 (n, *pixel_shape)
    pixel_shape: list[int] | None  # None while the gallery has never held an item


class GalleryStore:
    """One gallery: its EmbeddingIndex in memory (`index`, searched without touching the disk)
    and its records in SQLite. Writes (`add`, `remove`) are serialised per gallery; `close`
    waits for the one in flight, and later ones raise NotFound."""

    def __init__(self, root: Path, *, writable: bool = True):
        self.root, self.name, self.writable = root, root.name, writable
        try:
            self._db = connect(root / DB_FILE)
        except (FileNotFoundError, sqlite3.OperationalError):
            raise NotFound("index", root.name) from None
        self._reader = connect(root / DB_FILE)  # pixels: never waits for a write
        self._lock = threading.Lock()  # writes
        self._read_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self.closed = False
        self._info = {k: json.loads(v) for k, v in self._db.execute("SELECT name, value FROM info")}
        if self._info.get("format") != FORMAT:
            raise CorruptIndexError(f"{root}: format {self._info.get('format')}, expected {FORMAT}")
        self._row_bytes = {VECTOR_FILE: 4 * self._info["dim"], ID_FILE: 8}
        with gc_paused():
            self.index = self._load()

    # -- writing -------------------------------------------------------------------------------

    def add(self, keys: list[str], vectors: np.ndarray, pixels: np.ndarray,
            metadata: list[Any] | None, model_id: str) -> None:
        """Store new keys with their vectors, pixels and metadata: all or nothing, durable (one
        fsync) when this returns, then searchable."""
        with self._lock:
            self._check_open()
            pending = self.index.plan_add(keys, vectors, metadata, model_id=model_id)
            if not pending.keys:
                return
            pixels = np.ascontiguousarray(pixels, np.uint8)
            shape = list(pixels.shape[1:])
            if self._info["pixel_shape"] not in (None, shape) or len(pixels) != len(keys):
                raise ValueError(f"{len(pixels)} pixel records of shape {shape} for {len(keys)} "
                                 f"keys; the gallery holds {self._info['pixel_shape']}")
            if pending.trained:  # before the items that need it are committed
                atomic_write(self.root / TRAINED_FILE, [self.index.trained_state()])
            ids = pending.ids.tolist()
            with transaction(self._db):
                if self._info["pixel_shape"] is None:
                    self._db.execute("UPDATE info SET value = ? WHERE name = 'pixel_shape'",
                                     (json.dumps(shape),))
                self._db.executemany("INSERT INTO items VALUES (?, ?, ?)",
                                     zip(ids, pending.keys, pending.metadata, strict=True))
                self._db.executemany(
                    "INSERT INTO blobs VALUES (?, ?, ?)",
                    ((i, v.tobytes(), p.tobytes())
                     for i, v, p in zip(ids, pending.vectors, pixels, strict=True)))
            self._info["pixel_shape"] = shape
            self.index.apply_add(pending)

    def remove(self, keys: Sequence[str]) -> int:
        """Remove keys (all of them or, when one is unknown, none); durable when this returns."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            self._check_open()
            ids = [(i,) for i in self.index.ids_of(keys)]
            with transaction(self._db):
                self._db.executemany("DELETE FROM items WHERE id = ?", ids)
                self._db.executemany("DELETE FROM blobs WHERE id = ?", ids)
            return self.index.remove(keys)

    # -- reading -------------------------------------------------------------------------------

    def pixels(self, keys: Sequence[str]) -> np.ndarray:
        """uint8 (N, 3, H, W) pixels of keys (UnknownKeyError for keys not in the gallery)."""
        ids = self.index.ids_of(keys)
        with self._read_lock:
            self._check_open()
            rows = dict(select_ids(self._reader, "SELECT id, pixels FROM blobs WHERE id IN ({})",
                                   ids))
        gone = [k for k, i in zip(keys, ids, strict=True) if i not in rows]
        if gone:  # removed since `ids_of`
            raise UnknownKeyError(f"unknown keys: {gone[:5]}")
        shape = self._info["pixel_shape"]
        return np.stack([np.frombuffer(rows[i], np.uint8).reshape(shape) for i in ids])

    def export_page(self, offset: int, limit: int, max_bytes: int) -> ExportPage:
        """At most `limit` items from `offset` (insertion order) with their vectors and pixels,
        read from the database in one read transaction, and fewer when their stored bytes (key,
        metadata, vector, pixels) would pass `max_bytes` (at least one: an item alone over it
        is TooLarge). Memory stays within `max_bytes` whatever the gallery's size."""
        dim = self._info["dim"]
        keys, metadata, vectors, pixels, size = [], [], [], [], 0
        with self._read_lock:
            self._check_open()
            self._reader.execute("BEGIN")
            try:
                count = self._reader.execute("SELECT COUNT(*) FROM items").fetchone()[0]
                shape = json.loads(self._reader.execute(
                    "SELECT value FROM info WHERE name = 'pixel_shape'").fetchone()[0])
                rows = self._reader.execute(
                    "SELECT i.key, i.metadata, b.vector, b.pixels FROM items i JOIN blobs b "
                    "ON b.id = i.id ORDER BY i.id LIMIT ? OFFSET ?", (limit, offset))
                for key, meta, vector, pix in rows:
                    size += len(key.encode()) + len(meta or "") + len(vector) + len(pix)
                    if size > max_bytes:
                        if not keys:
                            raise TooLarge("response_too_large", f"item {key[:100]!r} alone "
                                           f"holds {size} bytes; the page limit is {max_bytes}")
                        break
                    keys.append(key)
                    metadata.append(meta)
                    vectors.append(vector)
                    pixels.append(pix)
            finally:
                self._reader.execute("COMMIT")
        return ExportPage(
            count, offset, keys, metadata,
            np.frombuffer(b"".join(vectors), np.float32).reshape(len(keys), dim),
            np.frombuffer(b"".join(pixels), np.uint8).reshape(len(keys), *(shape or [0])),
            shape)

    # -- background work and closing -----------------------------------------------------------

    def checkpoint(self) -> None:
        """Append the vectors committed since the last checkpoint to the vector file, and copy
        the WAL back into the database: off the request path; adds and searches go on."""
        with self._checkpoint_lock:
            if not self.closed and self.writable:
                self._checkpoint()

    def close(self, *, checkpoint: bool = True) -> None:
        """Wait for the write in flight, checkpoint (unless the gallery is being deleted), and
        release the files."""
        with self._lock, self._checkpoint_lock, self._read_lock:
            if self.closed:
                return
            self.closed = True
            if self.writable:
                if checkpoint:
                    self._checkpoint()
                self._bg.close()
                for f in self._files.values():
                    f.close()
            self._db.close()
            self._reader.close()

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise NotFound("index", self.name)

    def _checkpoint(self) -> None:
        rows = self._bg.execute("SELECT id, vector FROM blobs WHERE id > ? ORDER BY id",
                                (self._checkpointed_id,)).fetchall()
        if rows:
            self._append(np.array([r[0] for r in rows], np.int64),
                         np.frombuffer(b"".join(r[1] for r in rows), np.float32))
        self._bg.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _load(self) -> EmbeddingIndex:
        info = self._info
        rows = self._db.execute("SELECT id, key, metadata FROM items ORDER BY id").fetchall()
        id_list, keys, metadata = zip(*rows, strict=True) if rows else ((), [], [])
        del rows
        ids = np.array(id_list, np.int64)
        vectors = self._vectors(ids)
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        trained = self.root / TRAINED_FILE
        return EmbeddingIndex.restore(
            info["dim"], info["model_id"], info["factory"], keys=keys, ids=ids, vectors=vectors,
            metadata=metadata, next_id=0 if seq is None else seq[0] + 1,
            trained=np.fromfile(trained, np.uint8) if trained.exists() else None,
            nprobe=info["nprobe"], ef_search=info["ef_search"])

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of `ids` (ascending): the trusted rows of the vector file, the rest from
        the database. A writable store then repairs the file. When the file holds exactly the
        live ids, the result is a map of the file itself (the index copies it once)."""
        dim = self._info["dim"]
        sizes = [(self.root / f).stat().st_size // n if (self.root / f).exists() else 0
                 for f, n in self._row_bytes.items()]
        trusted = min(self._info["vector_rows"], *sizes)
        file_ids = np.fromfile(self.root / ID_FILE, np.int64, trusted) if trusted else \
            np.empty(0, np.int64)
        stored = np.memmap(self.root / VECTOR_FILE, np.float32, "r", shape=(trusted, dim)) \
            if trusted else np.empty((0, dim), np.float32)
        if np.array_equal(file_ids, ids):  # nothing removed, nothing missing
            out, live, missing = stored, len(ids), ids[:0]
        else:
            out = np.empty((len(ids), dim), np.float32)
            pos = np.searchsorted(ids, file_ids)
            hits = pos < len(ids)
            hits[hits] = ids[pos[hits]] == file_ids[hits]
            hits = np.flatnonzero(hits)
            out[pos[hits]] = stored[hits]
            have = np.zeros(len(ids), bool)
            have[pos[hits]], live = True, len(hits)
            missing = ids[~have]
            for i, blob in select_ids(self._db, "SELECT id, vector FROM blobs WHERE id IN ({})",
                                      missing):
                out[np.searchsorted(ids, i)] = np.frombuffer(blob, np.float32)
        if self.writable:
            self._repair(trusted, file_ids, live, ids, out, missing)
        return out

    def _repair(self, trusted: int, file_ids: np.ndarray, live: int, ids: np.ndarray,
                vectors: np.ndarray, missing: np.ndarray) -> None:
        """Drop the untrusted tail of the vector file, rewrite it when most rows are dead,
        append the rows it lacks; then checkpoints append to it."""
        self._bg = connect(self.root / DB_FILE)
        self._rows = trusted
        self._checkpointed_id = int(file_ids.max(initial=-1))
        if trusted - live > max(live, 1024):  # mostly removed items: rewrite it (atomically)
            atomic_write(self.root / ID_FILE, [ids.tobytes()])
            atomic_write(self.root / VECTOR_FILE, [vectors.tobytes()])
            self._set_rows(len(ids))
            self._checkpointed_id = max(self._checkpointed_id, int(ids.max(initial=-1)))
            missing = ids[:0]
        self._files = {}
        for name, row_bytes in self._row_bytes.items():
            path = self.root / name
            self._files[name] = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115
            self._files[name].truncate(self._rows * row_bytes)
        if len(missing):
            self._append(missing, vectors[np.searchsorted(ids, missing)])

    def _append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Write rows after the trusted ones, fsync, then commit their count."""
        for name, data in ((ID_FILE, ids), (VECTOR_FILE, vectors)):
            fd = self._files[name].fileno()
            os.pwrite(fd, np.ascontiguousarray(data).tobytes(), self._rows * self._row_bytes[name])
            os.fsync(fd)
        self._set_rows(self._rows + len(ids))
        self._checkpointed_id = max(self._checkpointed_id, int(ids.max()))

    def _set_rows(self, rows: int) -> None:
        with transaction(self._bg):
            self._bg.execute("UPDATE info SET value = ? WHERE name = 'vector_rows'", (str(rows),))
        self._rows = rows
