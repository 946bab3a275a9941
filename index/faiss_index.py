"""A FAISS index of embeddings under string keys, with JSON metadata, cosine similarity and
crash-safe persistence. It knows nothing of models beyond the `model_id` of its vectors.

Vectors are L2-normalised and searched by inner product, so scores are cosine similarities.
The index type is a FAISS factory string ("Flat" exact by default; "IVF1024,Flat", "HNSW32",
"IVF1024,PQ32", ... approximate). How each family stores user ids:

- flat codes (Flat, SQ8, PQ16): wrapped in IndexIDMap2, whose removal compacts both sides
  (O(n));
- IVF: ids live in the inverted lists, plus a hash table to reconstruct or remove by id (O(1)).
  An IndexIDMap2 around IVF is wrong after a removal (IVF does not renumber, the map assumes
  it does: search returns other items' keys);
- graphs (HNSW) cannot delete nodes: removal rebuilds the graph from the remaining vectors
  (O(n log n); exact for HNSW's flat storage, lossy when the storage is quantised).

So flat and graph types first turn removed ids into tombstones, which searches skip (a FAISS
ID selector), and remove them for good once MAX_TOMBSTONES have piled up (or before a save).

Searches may take a metadata filter (`parse_filter`: equality and "in" on top-level fields): the
matching ids come from an in-memory field index (field -> value -> ids), built by the first
filtered search and kept current by writes; up to MAX_EXACT_FILTERED matches are scored exactly
against their stored vectors, more go through FAISS with an ID selector. IndexPQ ("PQ16") takes
no search parameters at all, so it has no tombstones (a removal compacts it) and its filtered
searches are always exact.

Writes (add, update, remove) hold an exclusive lock, searches a shared one: FAISS crashes when
one thread adds while another searches. With faiss-gpu and a GPU, searches run on a GPU replica
(flat and IVF types) rebuilt after writes; GPU indexes are unsafe even for concurrent searches,
so there searches are exclusive too.
"""

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from byorl.files import atomic_write

FORMAT = 1
MAGIC = b"BYORLIDX"
GPU_MAX_K = 2048  # FAISS GPU kernels return at most this many neighbours
MAX_TOMBSTONES = 1024  # removed ids that searches skip before they are purged from FAISS
# A filtered search scores up to this many matching items exactly (their stored vectors, in
# numpy); more go through FAISS with an ID selector. EXACT_CHUNK: vectors reconstructed at once.
MAX_EXACT_FILTERED = 16_384
EXACT_CHUNK = 16_384

# Recent FAISS switches flat search to BLAS only when n_queries * dim >= 128000, a rule tuned
# for many-core servers (faiss PR #5022); with 1-2 threads BLAS wins from about 1000 (measured
# here, and faiss PR #5109): 12x faster for 200 queries of dimension 256. Process-wide setting.
if faiss.cvar.distance_compute_blas_threshold == 128_000:
    faiss.cvar.distance_compute_blas_threshold = 1024 * faiss.omp_get_max_threads()


class EmbeddingIndexError(Exception):
    """Base class of the errors an EmbeddingIndex raises."""


class DimensionMismatchError(EmbeddingIndexError, ValueError):
    """Vectors whose dimension is not the index's."""


class ModelMismatchError(EmbeddingIndexError, ValueError):
    """Vectors (or an index file) produced by another model than the one expected."""


class DuplicateKeyError(EmbeddingIndexError, ValueError):
    """`add` of a key that is already present: use `update` to change it."""


class UnknownKeyError(EmbeddingIndexError, KeyError):
    """A key that is not in the index."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class InvalidVectorError(EmbeddingIndexError, ValueError):
    """Vectors with NaN/inf or zero norm (no direction)."""


class InvalidMetadataError(EmbeddingIndexError, ValueError):
    """Metadata that JSON cannot represent."""


class InvalidFilterError(EmbeddingIndexError, ValueError):
    """A metadata filter of the wrong shape (see `parse_filter`)."""


class FilterTooLargeError(InvalidFilterError):
    """A filter with more fields or values than the caller allows."""


class TrainingError(EmbeddingIndexError, ValueError):
    """An IVF/PQ index trains on its first add, and that add held too few vectors."""


class CorruptIndexError(EmbeddingIndexError, ValueError):
    """A file that is not a loadable embedding index."""


@dataclass(frozen=True, slots=True)
class Hit:
    key: str
    score: float  # cosine similarity, in [-1, 1] (approximate for quantised types)
    metadata: Any


@dataclass(frozen=True, slots=True)
class Item:
    key: str
    vector: np.ndarray  # the stored, normalised vector (approximate for quantised types)
    metadata: Any


@dataclass(frozen=True, slots=True)
class PendingAdd:
    """A validated add and the ids its keys will take: what a durable store writes before
    `apply_add` makes it searchable."""

    keys: list[str]
    ids: np.ndarray  # int64, consecutive from the index's next id
    vectors: np.ndarray  # normalised float32 (n, dim)
    metadata: list[str | None]  # JSON texts
    trained: bool  # this add trained the index (IVF/PQ types): its trained state is new


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so it cannot starve."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def gpu_available() -> bool:
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def _make_index(dim: int, factory: str) -> faiss.Index:
    if "IDMap" in factory:
        raise ValueError(f"factory {factory!r} must not contain IDMap: ids are managed here")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory {factory!r} for dimension {dim}: {e}") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        flat = faiss.downcast_index(index)
        if isinstance(flat, faiss.IndexPQ):  # as for IVF-PQ below (53 s for 2000 vectors)
            flat.do_polysemous_training = False
        return faiss.IndexIDMap2(index)
    ivf = faiss.downcast_index(ivf)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    if isinstance(ivf, faiss.IndexIVFPQ):
        # Polysemous training (the factory's default) takes minutes and only serves Hamming
        # pre-filtering, which searches here never enable.
        ivf.do_polysemous_training = False
    return index


class EmbeddingIndex:
    """Unit vectors of one model under string keys, with optional JSON metadata per key.

    `nprobe` (IVF) and `ef_search` (HNSW) are search-time defaults, passed per call as FAISS
    search parameters (never set on the shared index) and saved with it.
    """

    def __init__(self, dim: int, model_id: str, factory: str = "Flat", *, nprobe: int = 16,
                 ef_search: int = 64, use_gpu: bool | None = None):
        if dim < 1:
            raise ValueError(f"dimension must be >= 1, got {dim}")
        if not model_id:
            raise ValueError("model_id must name the model that produced the vectors")
        self.dim, self.model_id, self.factory = dim, model_id, factory
        self.nprobe, self.ef_search = nprobe, ef_search
        self._index = _make_index(dim, factory)
        self._ids: dict[str, int] = {}
        self._keys: dict[int, str] = {}
        # id -> JSON text (validated once, copied on every read); None metadata is not stored
        self._meta: dict[int, str] = {}
        self._next_id = 0
        self._lock = _ReadWriteLock()
        self._ivf = faiss.try_extract_index_ivf(self._index) is not None
        inner = None if self._ivf else faiss.downcast_index(self._index.index)
        self._hnsw = isinstance(inner, faiss.IndexHNSW)
        self._rebuild_on_remove = inner is not None and not isinstance(inner, faiss.IndexFlatCodes)
        # IndexPQ (the "PQ16" factory) refuses any SearchParameters, so it takes no ID selector:
        # no tombstones (a removal compacts it), and filtered searches score exactly instead.
        self._selectors = not isinstance(inner, faiss.IndexPQ)
        self._on_gpu = ((gpu_available() if use_gpu is None else use_gpu)
                        and not self._rebuild_on_remove)
        self._gpu_index = None
        # Flat codes compact on removal (O(n)) and graphs rebuild: removed ids become tombstones
        # that searches skip, purged together. IVF removes in O(1); GPU copies take no filter.
        self._tombstones = not self._ivf and not self._on_gpu and self._selectors
        self._dead: set[int] = set()
        self._skip: tuple | None = None  # (IDSelectorNot, IDSelectorBatch) of the tombstones
        # Metadata filters: field -> value -> ids, built by the first filtered search (under the
        # read lock, so no write runs meanwhile: `_fields_lock` keeps two readers from building
        # it twice), then kept up to date by writes.
        self._fields: _FieldIndex | None = None
        self._fields_lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: str) -> bool:
        return key in self._ids

    def keys(self) -> list[str]:
        """All keys, in insertion order."""
        with self._lock.read():
            return list(self._ids)

    def page(self, offset: int, limit: int, *, raw_metadata: bool = False
             ) -> tuple[int, list[tuple[str, Any]]]:
        """(count, [(key, metadata)]) of keys offset..offset+limit in insertion order, read at
        one instant: concurrent removals never leave a listed key without its metadata.
        `raw_metadata` as in `search`."""
        with self._lock.read():
            start = min(offset, len(self._ids))  # islice refuses indexes past sys.maxsize
            keys = list(islice(self._ids, start, start + limit))
            return len(self._ids), [(k, self._metadata(self._ids[k], raw_metadata)) for k in keys]

    def ids_of(self, keys: Sequence[str]) -> list[int]:
        """The internal ids of keys (UnknownKeyError for a key not in the index)."""
        with self._lock.read():
            missing = [k for k in keys if k not in self._ids]
            if missing:
                raise UnknownKeyError(f"unknown keys: {missing[:5]}")
            return [self._ids[k] for k in keys]

    def get(self, key: str, *, raw_metadata: bool = False) -> Item:
        """The item under key; `raw_metadata` as in `search`."""
        with self._lock.read():
            if key not in self._ids:
                raise UnknownKeyError(f"unknown key {key!r}")
            vector = self._index.reconstruct(self._ids[key])
            return Item(key, vector, self._metadata(self._ids[key], raw_metadata))

    def search(self, queries, k: int = 10, *, model_id: str | None = None,
               nprobe: int | None = None, ef_search: int | None = None,
               raw_metadata: bool = False, filter: Mapping[str, Any] | None = None
               ) -> list[list[Hit]]:
        """The k most cosine-similar items of each query (a vector or an (n, dim) batch), best
        first; fewer than k when the index holds fewer items. `raw_metadata`: metadata as its
        stored JSON text (shared, not copied), for a server that writes it into a response
        without building Python objects of every hit's metadata.

        `filter` (see `parse_filter`): only items whose metadata matches it are candidates, and
        the k hits are the k most similar of those (never top-k, then filtered). When at most
        MAX_EXACT_FILTERED items match, or the type takes no ID selector, they are scored
        exactly against their stored vectors; more go through FAISS with an ID selector (exact
        for Flat, as approximate as the index otherwise)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        where = parse_filter(filter)
        q = self._normalised(queries, model_id)
        lock = self._lock.write if self._on_gpu else self._lock.read
        with lock():
            if not self._ids:
                return [[] for _ in range(len(q))]
            if where is not None:
                scores, ids = self._search_filtered(q, k, where, nprobe, ef_search)
            else:
                params = self._search_params(nprobe, ef_search)
                index = self._gpu() if k <= GPU_MAX_K else self._index
                scores, ids = index.search(q, min(k, len(self._ids)), params=params)
            return [
                [Hit(self._keys[i], float(s), self._metadata(i, raw_metadata))
                 for s, i in zip(srow, irow, strict=True) if i >= 0]
                for srow, irow in zip(scores, ids.tolist(), strict=True)
            ]

    # -- writing -------------------------------------------------------------------------------

    def add(self, keys: Sequence[str], vectors, metadata: Sequence[Any] | None = None, *,
            model_id: str | None = None) -> None:
        """Add new keys (a duplicate is refused). The first add trains IVF/PQ types on its
        vectors, so it must hold enough of them (at least the number of lists/centroids)."""
        pending = self._validated(keys, vectors, metadata, model_id)
        with self._lock.write():
            self._apply(self._planned(*pending))

    def plan_add(self, keys: Sequence[str], vectors, metadata: Sequence[Any] | None = None, *,
                 model_id: str | None = None) -> PendingAdd:
        """Validate an add and train an untrained index on it, without adding anything: a store
        writes the result durably, then `apply_add`s it. The caller serialises its writes (the
        plan holds until the next write)."""
        pending = self._validated(keys, vectors, metadata, model_id)
        with self._lock.write():
            return self._planned(*pending)

    def apply_add(self, pending: PendingAdd) -> None:
        """Make a planned add searchable (refused if another write came between)."""
        with self._lock.write():
            if pending.keys and (int(pending.ids[0]) != self._next_id
                                 or any(k in self._ids for k in pending.keys)):
                raise RuntimeError("the index changed since this add was planned")
            self._apply(pending)

    def _validated(self, keys, vectors, metadata, model_id) -> tuple:
        keys = key_list(keys)
        return keys, self._normalised(vectors, model_id, len(keys)), \
            metadata_texts(metadata, len(keys))

    def _planned(self, keys: list[str], x: np.ndarray, meta: list[str | None]) -> PendingAdd:
        """Duplicate check and training, under the write lock."""
        dupes, seen = [], set()
        for k in keys:
            if k in self._ids or k in seen:
                dupes.append(k)
            seen.add(k)
        if dupes:
            raise DuplicateKeyError(f"keys already present (use update): {dupes[:5]}")
        trained = bool(keys) and not self._index.is_trained
        if trained:
            try:
                self._index.train(x)
            except RuntimeError as e:
                raise TrainingError(
                    f"{self.factory} trains on its first add, which had only {len(x)} "
                    f"vectors: {str(e).splitlines()[0]}") from None
        ids = np.arange(self._next_id, self._next_id + len(keys), dtype=np.int64)
        return PendingAdd(keys, ids, x, meta, trained)

    def _apply(self, pending: PendingAdd) -> None:
        if not pending.keys:
            return
        self._index.add_with_ids(pending.vectors, pending.ids)
        self._gpu_index = None
        self._next_id = int(pending.ids[-1]) + 1
        for key, i, m in zip(pending.keys, pending.ids.tolist(), pending.metadata, strict=True):
            self._ids[key], self._keys[i] = i, key
            if m is not None:
                self._meta[i] = m
                if self._fields is not None:
                    self._fields.add(i, m)

    def update(self, key: str, vector=None, metadata: Any = None, *,
               model_id: str | None = None) -> None:
        """Replace the vector and/or the metadata of a key (None leaves that part unchanged).
        A new vector is a removal and an add: on HNSW types that rebuilds the graph."""
        x = None if vector is None else self._normalised(vector, model_id, 1)
        meta = None if metadata is None else metadata_texts([metadata], 1)[0]
        with self._lock.write():
            if key not in self._ids:
                raise UnknownKeyError(f"unknown key {key!r}")
            if x is not None:
                i = self._ids[key]
                self._remove_ids(np.array([i], dtype=np.int64))
                self._index.add_with_ids(x, np.array([i], dtype=np.int64))
                self._gpu_index = None
            if meta is not None:
                i = self._ids[key]
                if self._fields is not None:
                    self._fields.remove(i, self._meta.get(i))
                    self._fields.add(i, meta)
                self._meta[i] = meta

    def remove(self, keys: Sequence[str], *, missing_ok: bool = False) -> int:
        """Remove keys; returns how many were removed. Unknown keys raise unless missing_ok."""
        keys = list(dict.fromkeys(key_list(keys)))
        with self._lock.write():
            missing = [k for k in keys if k not in self._ids]
            if missing and not missing_ok:
                raise UnknownKeyError(f"unknown keys: {missing[:5]}")
            present = [k for k in keys if k in self._ids]
            ids = [self._ids[k] for k in present]
            for i, key in zip(ids, present, strict=True):
                del self._ids[key], self._keys[i]
                text = self._meta.pop(i, None)
                if self._fields is not None:
                    self._fields.remove(i, text)
            if not self._tombstones:
                self._remove_ids(np.array(ids, dtype=np.int64))
            elif ids:
                self._dead.update(ids)
                if len(self._dead) > MAX_TOMBSTONES:
                    self._purge()
                else:
                    batch = faiss.IDSelectorBatch(np.fromiter(self._dead, np.int64))
                    self._skip = (faiss.IDSelectorNot(batch), batch)
            return len(present)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the whole index (vectors, keys, metadata, model id) as one file, atomically."""
        with self._lock.write():
            self._purge()
        with self._lock.read():
            blob = faiss.serialize_index(self._index)
            keys = list(self._ids)
            header = {
                "format": FORMAT, "dim": self.dim, "model_id": self.model_id,
                "factory": self.factory, "nprobe": self.nprobe, "ef_search": self.ef_search,
                "keys": keys, "ids": [self._ids[k] for k in keys],
                "metadata": [self._meta.get(self._ids[k]) for k in keys],
                "index_bytes": blob.nbytes, "index_sha256": hashlib.sha256(blob).hexdigest(),
            }
        head = json.dumps(header).encode()
        atomic_write(path, [MAGIC, len(head).to_bytes(8, "little"), head, memoryview(blob)])

    @classmethod
    def load(cls, path: str | Path, *, model_id: str | None = None,
             use_gpu: bool | None = None) -> "EmbeddingIndex":
        """Read an index saved by `save`; with model_id, refuse one built from another model."""
        data = Path(path).read_bytes()
        if data[: len(MAGIC)] != MAGIC:
            raise CorruptIndexError(f"{path} is not an embedding index file")
        start = len(MAGIC) + 8
        end = start + int.from_bytes(data[len(MAGIC) : start], "little")
        try:
            h = json.loads(data[start:end])
        except ValueError as e:
            raise CorruptIndexError(f"{path}: unreadable header ({e})") from None
        if h.get("format") != FORMAT:
            raise CorruptIndexError(f"{path}: format {h.get('format')}, expected {FORMAT}")
        blob = np.frombuffer(data, dtype=np.uint8, offset=end)
        if blob.nbytes != h["index_bytes"] or hashlib.sha256(blob).hexdigest() != h["index_sha256"]:
            raise CorruptIndexError(f"{path}: the FAISS data does not match its checksum")
        if model_id is not None and h["model_id"] != model_id:
            raise ModelMismatchError(
                f"{path} holds vectors of model {h['model_id']!r}, expected {model_id!r}")
        obj = cls(h["dim"], h["model_id"], h["factory"], nprobe=h["nprobe"],
                  ef_search=h["ef_search"], use_gpu=use_gpu)
        obj._index = faiss.deserialize_index(blob)
        if obj._index.d != h["dim"] or obj._index.ntotal != len(h["keys"]):
            raise CorruptIndexError(f"{path}: the FAISS index disagrees with its key table")
        obj._ids = dict(zip(h["keys"], h["ids"], strict=True))
        obj._keys = {i: k for k, i in obj._ids.items()}
        obj._meta = {i: m for i, m in zip(h["ids"], h["metadata"], strict=True) if m is not None}
        obj._next_id = max(h["ids"], default=-1) + 1
        return obj

    def trained_state(self) -> np.ndarray:
        """The FAISS index emptied of its vectors, serialised: the trained state (IVF centroids,
        PQ codebooks) that `restore` re-adds vectors to without training again. It copies the
        index: take it while the index is small (right after the training add is planned)."""
        with self._lock.read():
            empty = faiss.clone_index(self._index)
        empty.reset()
        return faiss.serialize_index(empty)

    @classmethod
    def restore(cls, dim: int, model_id: str, factory: str, *, keys: Sequence[str], ids: np.ndarray,
                vectors: np.ndarray, metadata: Sequence[str | None], next_id: int,
                trained: np.ndarray | None = None, nprobe: int = 16, ef_search: int = 64,
                use_gpu: bool | None = None) -> "EmbeddingIndex":
        """An index rebuilt from a store's records: row i of `vectors` (normalised) and of
        `metadata` (JSON texts) belong to keys[i] and ids[i]; types that train get their vectors
        re-added to their saved `trained_state` (graphs are rebuilt: O(n log n))."""
        obj = cls(dim, model_id, factory, nprobe=nprobe, ef_search=ef_search, use_gpu=use_gpu)
        if trained is not None:
            obj._index = faiss.deserialize_index(trained)
        if keys:
            if not obj._index.is_trained:
                raise CorruptIndexError(f"a {factory} index with items but no trained state")
            obj._index.add_with_ids(np.ascontiguousarray(vectors, np.float32),
                                    np.asarray(ids, np.int64))
        id_list = np.asarray(ids).tolist()
        obj._ids = dict(zip(keys, id_list, strict=True))
        obj._keys = dict(zip(id_list, keys, strict=True))
        obj._meta = {i: m for i, m in zip(id_list, metadata, strict=True) if m is not None}
        obj._next_id = next_id
        return obj

    # -- internals -----------------------------------------------------------------------------

    def _normalised(self, vectors, model_id: str | None, n: int | None = None) -> np.ndarray:
        return normalised(vectors, self.dim, self.model_id, model_id, n)

    def _metadata(self, i: int, raw: bool = False) -> Any:
        text = self._meta.get(i)
        return text if raw or text is None else json.loads(text)

    def _search_params(self, nprobe: int | None, ef_search: int | None, sel=None):
        """FAISS search parameters, skipping tombstones (under the lock: they change), or
        searching only the ids of `sel` (which the caller keeps alive; it holds no tombstone)."""
        skip = {"sel": sel} if sel is not None else \
            {} if self._skip is None else {"sel": self._skip[0]}
        if self._ivf:
            return faiss.SearchParametersIVF(nprobe=nprobe or self.nprobe, **skip)
        if self._hnsw:
            return faiss.SearchParametersHNSW(efSearch=ef_search or self.ef_search, **skip)
        return faiss.SearchParameters(**skip) if skip else None

    def _search_filtered(self, q: np.ndarray, k: int, where: dict[str, set],
                         nprobe: int | None, ef_search: int | None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best items matching `where`, rows padded with id -1."""
        ids = self._field_index().matching(where)
        if not len(ids):
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        k = min(k, len(ids))
        if len(ids) <= MAX_EXACT_FILTERED or not self._selectors:
            return self._exact(q, ids, k)
        sel = faiss.IDSelectorBatch(ids)  # live ids only: the tombstones are not in it
        return self._index.search(q, k, params=self._search_params(nprobe, ef_search, sel))

    def _exact(self, q: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of `ids` by inner product with their stored (reconstructed) vectors, in
        chunks (memory: queries x (chunk + k) scores); ties by id."""
        best_s = np.empty((len(q), 0), np.float32)
        best_i = np.empty((len(q), 0), np.int64)
        for start in range(0, len(ids), EXACT_CHUNK):
            chunk = ids[start:start + EXACT_CHUNK]
            scores = q @ self._index.reconstruct_batch(chunk).T
            s = np.concatenate([best_s, scores], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(chunk, scores.shape)], axis=1)
            if s.shape[1] > k:
                part = np.argpartition(-s, k - 1, axis=1)[:, :k]
                s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
            order = np.lexsort((i, -s), axis=1)
            best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        return best_s, best_i

    def _field_index(self) -> "_FieldIndex":
        """The field index, built on first use (under the read or the write lock)."""
        if self._fields is None:
            with self._fields_lock:
                if self._fields is None:
                    fields = _FieldIndex()
                    for i, text in self._meta.items():
                        fields.add(i, text)
                    self._fields = fields
        return self._fields

    def _purge(self) -> None:
        """Remove the tombstoned vectors for good (O(n) once per MAX_TOMBSTONES removals)."""
        if self._dead:
            self._remove_ids(np.fromiter(self._dead, np.int64))
            self._dead.clear()
            self._skip = None

    def _gpu(self) -> faiss.Index:
        if not self._on_gpu:
            return self._index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
        return self._gpu_index

    def _remove_ids(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        self._gpu_index = None
        if not self._rebuild_on_remove:
            self._index.remove_ids(ids)
            return
        # A graph cannot drop nodes: rebuild it, keeping the trained storage, from the rest.
        all_ids = faiss.vector_to_array(self._index.id_map)
        inner = self._index.index
        keep = ~np.isin(all_ids, ids)
        vectors = inner.reconstruct_n(0, inner.ntotal)[keep]
        fresh = faiss.clone_index(self._index)
        fresh.reset()
        fresh.add_with_ids(vectors, all_ids[keep])
        self._index = fresh


def normalised(vectors, dim: int, model_id: str, given_model_id: str | None = None,
               n: int | None = None) -> np.ndarray:
    """Vectors (one or an (n, dim) batch) as unit float32 rows, for a store of `dim`-d vectors of
    model `model_id`: ModelMismatchError, DimensionMismatchError or InvalidVectorError (and
    ValueError when `n` rows were expected) for anything else."""
    if given_model_id is not None and given_model_id != model_id:
        raise ModelMismatchError(
            f"vectors of model {given_model_id!r} given to an index of model {model_id!r}")
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise DimensionMismatchError(
            f"expected vectors of dimension {dim}, got an array of shape {x.shape}")
    if n is not None and len(x) != n:
        raise ValueError(f"{n} keys but {len(x)} vectors")
    if not np.isfinite(x).all():
        raise InvalidVectorError("vectors contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        rows = np.flatnonzero(norms[:, 0] == 0)[:5].tolist()
        raise InvalidVectorError(f"zero vectors have no direction (rows {rows})")
    return np.ascontiguousarray(x / norms)


def key_list(keys: Sequence[str]) -> list[str]:
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of strings, not one string")
    keys = list(keys)
    bad = [k for k in keys if not isinstance(k, str)]
    if bad:
        raise TypeError(f"keys must be strings, got {bad[:3]}")
    return keys


def metadata_texts(metadata: Sequence[Any] | None, n: int) -> list[str | None]:
    if metadata is None:
        return [None] * n
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"{n} keys but {len(metadata)} metadata entries")
    try:
        return [None if m is None else json.dumps(m, allow_nan=False) for m in metadata]
    except (TypeError, ValueError) as e:
        raise InvalidMetadataError(f"metadata must be JSON-serialisable: {e}") from None


# -- metadata filters ------------------------------------------------------------------------------

# Index terms of the JSON scalars that Python would confuse: True == 1 and False == 0 in Python
# (and hash alike), never in JSON. Numbers stay numbers, so 1 and 1.0 are one term (JSON has one
# number type); strings stay strings, so "1" is another.
_TRUE, _FALSE, _NULL = object(), object(), object()
_SCALARS = (str, int, float)  # bool is an int


def _term(value: Any) -> Any:
    if value is True:
        return _TRUE
    if value is False:
        return _FALSE
    return _NULL if value is None else value


def term_value(term: Any) -> Any:
    """The JSON scalar of a term of `parse_filter`'s result (True, False, None, or itself)."""
    return {id(_TRUE): True, id(_FALSE): False, id(_NULL): None}.get(id(term), term)


def _terms(text: str | None) -> list[tuple[str, Any]]:
    """(field, term) of each top-level scalar field of a JSON object's text; nothing for other
    metadata (arrays, strings, ...) or for fields whose value is an array or object."""
    if text is None or not text.startswith("{"):
        return []
    return [(f, _term(v)) for f, v in json.loads(text).items()
            if v is None or isinstance(v, _SCALARS)]


def parse_filter(spec: Mapping[str, Any] | None, *, max_fields: int | None = None,
                 max_values: int | None = None) -> dict[str, set] | None:
    """A filter as {field: the set of terms it may take} (None: no condition), or
    InvalidFilterError naming what is wrong.

    A filter is a JSON object over top-level metadata fields, all of which must match: a JSON
    scalar (string, number, true/false, null) means equality, `{"in": [scalars]}` membership.
    Equality is JSON's: 1 matches 1 and 1.0, never "1" or true. Items whose metadata is not an
    object, or lacks the field, or holds an array or object there, never match. `max_fields` /
    `max_values` bound the conditions and the values of all of them together
    (FilterTooLargeError)."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise InvalidFilterError(f"a filter is a JSON object of field conditions, e.g. "
                                 f'{{"source": "web", "label": {{"in": [1, 2]}}}}, not '
                                 f"{type(spec).__name__}")
    if max_fields is not None and len(spec) > max_fields:
        raise FilterTooLargeError(f"the filter has {len(spec)} fields; the limit is {max_fields}")
    out, count = {}, 0
    for field, condition in spec.items():
        if not isinstance(field, str) or not field:
            raise InvalidFilterError(f"filter field names are non-empty strings, got {field!r}")
        name = f"filter field {field[:100]!r}"
        if isinstance(condition, Mapping):
            if list(condition) != ["in"]:
                extra = [str(op)[:50] for op in condition if op != "in"][:5]
                raise InvalidFilterError(
                    f"{name}: an object condition is {{\"in\": [values]}}"
                    + (f"; unknown operator(s) {extra}" if extra else ""))
            values = condition["in"]
            if not isinstance(values, list | tuple):
                raise InvalidFilterError(f"{name}: \"in\" takes a list of JSON scalars, got "
                                         f"{type(values).__name__}")
        elif isinstance(condition, list | tuple):
            raise InvalidFilterError(f"{name}: a list is not a value; for membership write "
                                     f'{{"in": [...]}}')
        else:
            values = [condition]
        count += len(values)
        if max_values is not None and count > max_values:
            raise FilterTooLargeError(f"the filter has more than {max_values} values (equalities "
                                      f"and \"in\" values together); the limit is {max_values}")
        for v in values:
            if not (v is None or isinstance(v, _SCALARS)):
                raise InvalidFilterError(f"{name}: values are JSON scalars (string, number, "
                                         f"true, false, null), got {type(v).__name__}")
            if isinstance(v, float) and not np.isfinite(v):
                raise InvalidFilterError(f"{name}: {v} is not a JSON number")
        out[field] = {_term(v) for v in values}
    return out or None  # {}: no condition


class _FieldIndex:
    """field -> term -> ids holding it, of the top-level scalar fields of every item's metadata
    (a single id is kept as an int: most values of a field like a URL belong to one item)."""

    def __init__(self):
        self._map: dict[str, dict[Any, int | set[int]]] = {}

    def add(self, i: int, text: str | None) -> None:
        for field, term in _terms(text):
            terms = self._map.setdefault(field, {})
            ids = terms.get(term)
            if ids is None:
                terms[term] = i
            elif isinstance(ids, int):
                terms[term] = {ids, i}
            else:
                ids.add(i)

    def remove(self, i: int, text: str | None) -> None:
        for field, term in _terms(text):
            terms = self._map[field]
            ids = terms[term]
            if isinstance(ids, int):
                del terms[term]
                if not terms:
                    del self._map[field]
            else:
                ids.discard(i)
                if len(ids) == 1:
                    terms[term] = next(iter(ids))

    def matching(self, where: dict[str, set]) -> np.ndarray:
        """The ids (sorted int64) that match every field's terms."""
        groups = []
        for field, wanted in where.items():
            terms = self._map.get(field, {})
            group = [terms[t] for t in wanted if t in terms]
            if not group:
                return np.empty(0, np.int64)
            groups.append(group)
        sets = []
        for group in groups:  # the union of each field's terms (shared when it is one set)
            if len(group) == 1:
                sets.append({group[0]} if isinstance(group[0], int) else group[0])
            else:
                union: set[int] = set()
                for ids in group:
                    union.update((ids,) if isinstance(ids, int) else ids)
                sets.append(union)
        sets.sort(key=len)
        found = sets[0].intersection(*sets[1:]) if len(sets) > 1 else sets[0]
        out = np.fromiter(found, np.int64, len(found))
        out.sort()
        return out
