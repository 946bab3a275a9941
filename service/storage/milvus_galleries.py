"""Galleries on a Milvus server (`BYORL_MILVUS_URI`): one collection per gallery, its catalog
and keys in the service's SQL database, so that every api replica and worker sees the same
galleries.

    Milvus collection <prefix><name>_<8 hex>   key (VARCHAR primary key), vector (FLOAT_VECTOR,
                                               IP metric on unit vectors: cosine), meta (the
                                               metadata's JSON text, "" for none), filt (JSON:
                                               its top-level scalar fields, typed, for filters),
                                               pixels_0.. (the model-input uint8 pixels, base64,
                                               split over VARCHARs of at most 65,535 bytes)
    SQL galleries                              name, model id, dim, factory, collection, pixel
                                               shape (database.py: GALLERIES)
    SQL gallery_items                          (gallery, key) unique, id: the insertion sequence

Milvus accepts a primary key twice (and then counts both), and its `query` pages in primary-key
order: so the items table refuses duplicates (409) before anything reaches Milvus, counts, and
orders pages (insertion order). An add is one SQL transaction around the Milvus upsert: the
keys are committed only once Milvus acknowledged their rows, and a failed upsert rolls them
back. A gallery's catalog row is locked by its writes (PostgreSQL: FOR UPDATE; SQLite: the
write lock), so a delete waits for the add in flight; a re-created gallery gets a new
collection.

Reads of items (pages, exports, pixels) query Milvus at Strong consistency (they follow the
SQL keys just read); searches at the request's consistency, `milvus_consistency` by default.
"""

import base64
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from byorl.index.faiss_index import (
    DuplicateKeyError,
    Hit,
    UnknownKeyError,
    key_list,
    metadata_texts,
    normalised,
    parse_filter,
    term_value,
)
from byorl.service.exceptions import Conflict, Invalid, NotFound, TooLarge
from byorl.service.names import check_name
from byorl.service.settings import Settings
from byorl.service.storage.database import GALLERIES, GALLERY_ITEMS, Database, open_database
from byorl.service.storage.gallery_store import ExportPage

log = logging.getLogger(__name__)

VARCHAR_BYTES = 65_535  # the longest VARCHAR of Milvus 2.3
KEY_BYTES = 1024  # a key's UTF-8 bytes (the API allows 256 characters)
UPSERT_BYTES = 16 * 2**20  # rows of one upsert call (gRPC's message limit is 64 MB)
QUERY_KEYS = 512  # keys of one `key in [...]` query
# Factory strings a Milvus gallery takes: Flat (exact), HNSW<M>, IVF<lists>,Flat. The default
# (README, "Galleries on Milvus": recall measured on CIFAR-10 embeddings of models/default).
FACTORY = re.compile(r"Flat|HNSW(?P<m>\d+)|IVF(?P<lists>\d+),Flat")
DEFAULT_FACTORY = "HNSW16"
EF_CONSTRUCTION = 200
DEFAULT_EF, DEFAULT_NPROBE = 64, 16  # as the embedded galleries' defaults
CONSISTENCY = {"bounded": "Bounded", "strong": "Strong"}
INT64 = 2**63


def index_params(factory: str, settings: Settings) -> tuple[str, dict]:
    """(Milvus index type, build params) of a factory string, bounded as check_factory bounds
    the embedded galleries' (Invalid otherwise)."""
    match = FACTORY.fullmatch(factory)
    if match is None:
        raise Invalid("invalid_factory", f"factory {factory[:100]!r} is not one a Milvus gallery "
                      "takes: Flat, HNSW<degree> or IVF<lists>,Flat")
    if match["m"] is not None:
        m = int(match["m"])
        if not 2 <= m <= min(settings.max_factory_graph_degree, 2048):
            raise Invalid("factory_out_of_bounds", f"factory {factory!r}: HNSW degree {m} is "
                          f"outside 2..{settings.max_factory_graph_degree} "
                          "(MAX_FACTORY_GRAPH_DEGREE)")
        return "HNSW", {"M": m, "efConstruction": EF_CONSTRUCTION}
    if match["lists"] is not None:
        lists = int(match["lists"])
        if not 1 <= lists <= min(settings.max_factory_lists, 65_536):
            raise Invalid("factory_out_of_bounds", f"factory {factory!r}: IVF lists {lists} is "
                          f"outside 1..{settings.max_factory_lists} (MAX_FACTORY_LISTS)")
        return "IVF_FLAT", {"nlist": lists}
    return "FLAT", {}


def filter_expression(spec: Any) -> str:
    """A metadata filter (`parse_filter`) as a Milvus expression on the `filt` field, where
    strings are stored as "s" + the string and null as "n" (so that no string, number, boolean
    or null equals another kind: 1 matches 1 and 1.0, never "1" or true); "" for none."""
    where = parse_filter(spec)
    if where is None:
        return ""
    parts = []
    for field, terms in where.items():
        # the field name escaped as `_filter_fields` stores it (ASCII JSON): Milvus matches a
        # JSON path by its escaped text ("é" raw found nothing; values compare decoded, and
        # escaped astral characters do not parse: those stay raw)
        name = f"filt[{json.dumps(field)}]"
        values = sorted({_literal(term_value(t)) for t in terms})
        parts.append("(" + " or ".join(f"{name} == {v}" for v in values) + ")")
    return " and ".join(parts)


def _literal(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return '"n"'
    if isinstance(value, str):
        return json.dumps("s" + value, ensure_ascii=False)
    if isinstance(value, int) and -INT64 <= value < INT64:
        return str(value)
    return repr(float(value))


def _filter_fields(text: str | None) -> str:
    """The `filt` JSON of a metadata text: top-level scalar fields of an object, typed."""
    if text is None or not text.startswith("{"):
        return "{}"
    out = {}
    for field, value in json.loads(text).items():
        if value is None:
            out[field] = "n"
        elif isinstance(value, str):
            out[field] = "s" + value
        elif isinstance(value, bool | float) or (isinstance(value, int)
                                                 and -INT64 <= value < INT64):
            out[field] = value
    return json.dumps(out)


def _chunks(seq: Sequence, size: int):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def _keys_expression(keys: Sequence[str]) -> str:
    """`key in [...]`, each key a JSON string literal (escaped quotes and backslashes: pymilvus's
    `delete(ids=...)` quotes string ids without escaping, so a key with ' or \\ was a 500)."""
    return f"key in {json.dumps(list(keys), ensure_ascii=False)}"


@dataclass(frozen=True)
class MilvusGallery:
    """What `MilvusGalleries.get` returns, as `Galleries.get` returns an EmbeddingIndex: the
    gallery's catalog entry, and its count and pages read through the back-end."""

    backend: "MilvusGalleries"
    name: str
    model_id: str
    dim: int
    factory: str
    collection: str
    pixel_shape: list[int] | None
    pixel_fields: int

    def __len__(self) -> int:
        return self.backend.count(self.name)

    def page(self, offset: int, limit: int, *, raw_metadata: bool = False
             ) -> tuple[int, list[tuple[str, Any]]]:
        return self.backend.page(self, offset, limit, raw_metadata=raw_metadata)

    def keys(self) -> list[str]:
        return self.backend.keys(self.name)

    def search(self, queries, k: int = 10, **options) -> list[list[Hit]]:
        return self.backend.search(self.name, queries, k, **options)


class MilvusGalleries:
    """The galleries of one Milvus server and one SQL database (the `Galleries` interface)."""

    def __init__(self, settings: Settings, db: Database | None = None):
        from pymilvus import MilvusClient  # only this back-end needs it

        self.settings = settings
        self.db = db or open_database(settings.database())
        self.client = MilvusClient(settings.milvus_uri,
                                   token=settings.milvus_token.get_secret_value())
        self.prefix = settings.milvus_prefix
        self.consistency = settings.milvus_consistency

    # -- the catalog ---------------------------------------------------------------------------

    def _gallery(self, row) -> MilvusGallery:
        return MilvusGallery(self, row.name, row.model_id, row.dim, row.factory, row.collection,
                             None if row.pixel_shape is None else json.loads(row.pixel_shape),
                             row.pixel_fields)

    def get(self, name: str) -> MilvusGallery:
        # a name no gallery can have is not found, and never reaches the database (PostgreSQL's
        # text refuses NUL: a path /indexes/a%00b was a 500)
        check_name(name, "index")
        with self.db.read() as conn:
            row = conn.execute(select(GALLERIES).where(GALLERIES.c.name == name)).first()
        if row is None:
            raise NotFound("index", name)
        return self._gallery(row)

    def names(self) -> list[str]:
        with self.db.read() as conn:
            return list(conn.execute(select(GALLERIES.c.name).order_by(GALLERIES.c.name))
                        .scalars())

    def indexes(self) -> list[tuple[str, MilvusGallery]]:
        with self.db.read() as conn:
            rows = conn.execute(select(GALLERIES).order_by(GALLERIES.c.name)).all()
        return [(row.name, self._gallery(row)) for row in rows]

    def count(self, name: str) -> int:
        with self.db.read() as conn:
            return conn.execute(select(func.count()).select_from(GALLERY_ITEMS)
                                .where(GALLERY_ITEMS.c.gallery == name)).scalar_one()

    def keys(self, name: str) -> list[str]:
        with self.db.read() as conn:
            return list(conn.execute(select(GALLERY_ITEMS.c.key)
                                     .where(GALLERY_ITEMS.c.gallery == name)
                                     .order_by(GALLERY_ITEMS.c.id)).scalars())

    def create(self, name: str, dim: int, model_id: str, factory: str | None = None
               ) -> MilvusGallery:
        from pymilvus import DataType, MilvusClient

        check_name(name, "index")
        factory = factory or DEFAULT_FACTORY
        index_type, params = index_params(factory, self.settings)
        if name in self.names():
            raise Conflict(f"index {name!r} already exists")
        side = self.settings.max_model_input_size
        fields = max(1, math.ceil(4 * math.ceil(3 * side * side / 3) / VARCHAR_BYTES))
        collection = f"{self.prefix}{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{uuid.uuid4().hex[:8]}"
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("meta", DataType.VARCHAR, max_length=VARCHAR_BYTES)
        schema.add_field("filt", DataType.JSON)
        for i in range(fields):
            schema.add_field(f"pixels_{i}", DataType.VARCHAR, max_length=VARCHAR_BYTES)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP",
                        params=params)
        self.client.create_collection(collection, schema=schema, index_params=index,
                                      consistency_level="Bounded")  # and loads it
        try:
            with self.db.transaction() as conn:
                conn.execute(insert(GALLERIES).values(
                    name=name, model_id=model_id, dim=dim, factory=factory,
                    collection=collection, pixel_shape=None, pixel_fields=fields,
                    created_at=time.time()))
        except IntegrityError:
            self.client.drop_collection(collection)
            raise Conflict(f"index {name!r} already exists") from None
        return self.get(name)

    def delete(self, name: str) -> None:
        """Waits for the write in flight (its lock on the catalog row); later ones are 404."""
        with self.db.transaction() as conn:
            row = self._locked(conn, name)
            conn.execute(delete(GALLERY_ITEMS).where(GALLERY_ITEMS.c.gallery == name))
            conn.execute(delete(GALLERIES).where(GALLERIES.c.name == name))
        try:
            self.client.drop_collection(row.collection)
        except Exception:  # the gallery is gone; its collection stays until dropped by hand
            log.exception("could not drop collection %s of deleted gallery %s",
                          row.collection, name)

    def _locked(self, conn, name: str):
        check_name(name, "index")
        row = conn.execute(select(GALLERIES).where(GALLERIES.c.name == name)
                           .with_for_update()).first()
        if row is None:
            raise NotFound("index", name)
        return row

    # -- writing -------------------------------------------------------------------------------

    def add(self, name: str, keys: list[str], vectors: np.ndarray, pixels: np.ndarray,
            metadata: list[Any] | None, model_id: str) -> None:
        """Store new keys (all or nothing; a key present, or twice in `keys`, is a 409)."""
        gallery = self.get(name)
        keys = key_list(keys)
        x = normalised(vectors, gallery.dim, gallery.model_id, model_id, len(keys))
        texts = metadata_texts(metadata, len(keys))
        twice = [k for k, n in _counts(keys).items() if n > 1]
        if twice:
            raise DuplicateKeyError(f"keys already present (use update): {twice[:5]}")
        if not keys:
            return
        pixels = np.ascontiguousarray(pixels, np.uint8)
        shape = list(pixels.shape[1:])
        long = [k for k in keys if len(k.encode()) > KEY_BYTES]
        if long:
            raise Invalid("key_too_long", f"key {long[0][:100]!r}... is over {KEY_BYTES} bytes")
        big = [i for i, t in enumerate(texts) if t is not None and len(t.encode()) > VARCHAR_BYTES]
        if big:
            raise TooLarge("metadata_too_large", f"metadata[{big[0]}] is over {VARCHAR_BYTES} "
                           "bytes as JSON, the most a Milvus gallery stores")
        rows = self._rows(gallery, keys, x, texts, pixels)
        upserted = False
        try:
            with self.db.transaction() as conn:
                row = self._locked(conn, name)
                if row.collection != gallery.collection:
                    raise NotFound("index", name)  # deleted and created again meanwhile
                held = None if row.pixel_shape is None else json.loads(row.pixel_shape)
                if held not in (None, shape) or len(pixels) != len(keys):
                    raise ValueError(f"{len(pixels)} pixel records of shape {shape} for "
                                     f"{len(keys)} keys; the gallery holds {held}")
                present = []
                for chunk in _chunks(keys, QUERY_KEYS):
                    present += conn.execute(select(GALLERY_ITEMS.c.key).where(
                        GALLERY_ITEMS.c.gallery == name, GALLERY_ITEMS.c.key.in_(chunk))
                    ).scalars().all()
                if present:
                    raise DuplicateKeyError(f"keys already present (use update): {present[:5]}")
                conn.execute(insert(GALLERY_ITEMS), [{"gallery": name, "key": k} for k in keys])
                if held is None:
                    conn.execute(update(GALLERIES).where(GALLERIES.c.name == name)
                                 .values(pixel_shape=json.dumps(shape)))
                upserted = True
                for batch in self._batches(rows):
                    self.client.upsert(gallery.collection, batch)
        except IntegrityError:  # PostgreSQL: another add of the same key committed first
            self._forget(gallery, keys if upserted else [])
            raise DuplicateKeyError(f"keys already present (use update): {keys[:5]}") from None
        except BaseException:
            self._forget(gallery, keys if upserted else [])
            raise

    def _forget(self, gallery: MilvusGallery, keys: list[str]) -> None:
        """Remove from Milvus the rows of an add whose keys were not committed (best effort:
        an upsert of the key later replaces a row left behind)."""
        try:
            for chunk in _chunks(keys, QUERY_KEYS):
                self.client.delete(gallery.collection, filter=_keys_expression(chunk))
        except Exception:
            log.exception("could not remove the rows of a failed add from %s", gallery.collection)

    def _rows(self, gallery: MilvusGallery, keys: list[str], x: np.ndarray,
              texts: list[str | None], pixels: np.ndarray) -> list[dict]:
        rows = []
        for key, vector, text, pix in zip(keys, x, texts, pixels, strict=True):
            encoded = base64.b64encode(pix.tobytes()).decode()
            parts = [encoded[i:i + VARCHAR_BYTES] for i in range(0, len(encoded), VARCHAR_BYTES)]
            if len(parts) > gallery.pixel_fields:
                most = gallery.pixel_fields * VARCHAR_BYTES * 3 // 4
                raise Invalid("pixels_too_large", f"{pix.nbytes} bytes of pixels per item; this "
                              f"gallery stores at most {most}")
            parts += [""] * (gallery.pixel_fields - len(parts))
            rows.append({"key": key, "vector": vector.tolist(), "meta": text or "",
                         "filt": _filter_fields(text),
                         **{f"pixels_{i}": p for i, p in enumerate(parts)}})
        return rows

    @staticmethod
    def _batches(rows: list[dict]):
        batch, size = [], 0
        for row in rows:
            n = sum(len(v) if isinstance(v, str) else 4 * len(v) if isinstance(v, list) else 8
                    for v in row.values())
            if batch and size + n > UPSERT_BYTES:
                yield batch
                batch, size = [], 0
            batch.append(row)
            size += n
        if batch:
            yield batch

    def add_vectors(self, name: str, keys: list[str], vectors: bytes, pixels: bytes,
                    metadata: list[Any] | None, model_id: str, pixel_shape: tuple[int, ...],
                    limit: int) -> None:
        """As `Galleries.add_vectors`: items of an export, checked, then `add`ed."""
        from byorl.service.storage.galleries import decode_export

        gallery = self.get(name)
        v, p = decode_export(keys, vectors, pixels, gallery.dim, pixel_shape, limit)
        self.add(name, keys, v, p, metadata, model_id)

    def remove(self, name: str, keys: list[str]) -> int:
        """Remove keys (all of them or, when one is unknown, none)."""
        keys = list(dict.fromkeys(key_list(keys)))
        with self.db.transaction() as conn:
            row = self._locked(conn, name)
            present = set()
            # no stored key holds NUL (the API refuses it; PostgreSQL's text cannot hold it)
            for chunk in _chunks([k for k in keys if "\x00" not in k], QUERY_KEYS):
                present.update(conn.execute(select(GALLERY_ITEMS.c.key).where(
                    GALLERY_ITEMS.c.gallery == name, GALLERY_ITEMS.c.key.in_(chunk))).scalars())
            missing = [k for k in keys if k not in present]
            if missing:
                raise UnknownKeyError(f"unknown keys: {missing[:5]}")
            for chunk in _chunks(keys, QUERY_KEYS):
                conn.execute(delete(GALLERY_ITEMS).where(GALLERY_ITEMS.c.gallery == name,
                                                         GALLERY_ITEMS.c.key.in_(chunk)))
                self.client.delete(row.collection, filter=_keys_expression(chunk))
        return len(keys)

    # -- reading -------------------------------------------------------------------------------

    def search(self, name: str, queries, k: int = 10, *, model_id: str | None = None,
               nprobe: int | None = None, ef_search: int | None = None,
               raw_metadata: bool = False, filter: Any = None,
               consistency: str | None = None) -> list[list[Hit]]:
        """The k most cosine-similar items of each query, best first (EmbeddingIndex.search);
        `consistency` "strong" sees every acknowledged write, "bounded" (the default setting)
        may miss the last seconds' (Milvus's gracefulTime)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        gallery = self.get(name)
        expr = filter_expression(filter)
        q = normalised(queries, gallery.dim, gallery.model_id, model_id)
        index_type, _ = index_params(gallery.factory, self.settings)
        params = {"HNSW": {"ef": max(ef_search or DEFAULT_EF, k)},
                  "IVF_FLAT": {"nprobe": nprobe or DEFAULT_NPROBE}}.get(index_type, {})
        result = self.client.search(
            gallery.collection, data=q.tolist(), limit=k, filter=expr, output_fields=["meta"],
            search_params={"metric_type": "IP", "params": params},
            consistency_level=CONSISTENCY[consistency or self.consistency])
        return [[Hit(hit["id"], float(hit["distance"]),
                     _metadata(hit["entity"]["meta"], raw_metadata)) for hit in row]
                for row in result]

    def _fetch(self, gallery: MilvusGallery, keys: Sequence[str], fields: list[str]
               ) -> dict[str, dict]:
        """key -> the row's fields, of the keys Milvus holds, read at Strong consistency."""
        out = {}
        for chunk in _chunks(list(keys), QUERY_KEYS):
            for row in self.client.query(gallery.collection, filter=_keys_expression(chunk),
                                         output_fields=fields, consistency_level="Strong"):
                out[row["key"]] = row
        return out

    def _page_keys(self, name: str, offset: int, limit: int) -> tuple[int, list[str]]:
        with self.db.read() as conn:
            count = conn.execute(select(func.count()).select_from(GALLERY_ITEMS)
                                 .where(GALLERY_ITEMS.c.gallery == name)).scalar_one()
            keys = list(conn.execute(select(GALLERY_ITEMS.c.key)
                                     .where(GALLERY_ITEMS.c.gallery == name)
                                     .order_by(GALLERY_ITEMS.c.id)
                                     .offset(min(offset, count)).limit(limit)).scalars())
        return count, keys

    def page(self, gallery: MilvusGallery, offset: int, limit: int, *,
             raw_metadata: bool = False) -> tuple[int, list[tuple[str, Any]]]:
        """(count, [(key, metadata)]) in insertion order (a key removed between the two reads
        is left out)."""
        count, keys = self._page_keys(gallery.name, offset, limit)
        rows = self._fetch(gallery, keys, ["meta"])
        return count, [(k, _metadata(rows[k]["meta"], raw_metadata)) for k in keys if k in rows]

    def pixels(self, name: str, keys: list[str]) -> np.ndarray:
        """uint8 (N, 3, H, W) pixels of keys (UnknownKeyError for keys not in the gallery)."""
        gallery = self.get(name)
        fields = [f"pixels_{i}" for i in range(gallery.pixel_fields)]
        rows = self._fetch(gallery, list(dict.fromkeys(keys)), fields)
        gone = [k for k in keys if k not in rows]
        if gone:
            raise UnknownKeyError(f"unknown keys: {gone[:5]}")
        return np.stack([_pixels(rows[k], fields, gallery.pixel_shape) for k in keys])

    def export_page(self, name: str, offset: int, limit: int, max_bytes: int) -> ExportPage:
        """As GalleryStore.export_page: at most `limit` items from `offset` (insertion order),
        fewer when their bytes would pass `max_bytes` (an item alone over it is TooLarge)."""
        gallery = self.get(name)
        count, keys = self._page_keys(name, offset, limit)
        fields = ["vector", "meta"] + [f"pixels_{i}" for i in range(gallery.pixel_fields)]
        shape = gallery.pixel_shape
        out_keys, metadata, vectors, pixels, size = [], [], [], [], 0
        per_item = 4 * gallery.dim + (math.prod(shape) if shape else 0)
        chunk = max(1, min(QUERY_KEYS, max_bytes // max(per_item, 1) + 1))
        for part in _chunks(keys, chunk):
            rows = self._fetch(gallery, part, fields)
            for key in part:
                if key not in rows:
                    continue  # removed meanwhile
                row = rows[key]
                size += len(key.encode()) + len(row["meta"]) + per_item
                if size > max_bytes:
                    if not out_keys:
                        raise TooLarge("response_too_large", f"item {key[:100]!r} alone holds "
                                       f"{size} bytes; the page limit is {max_bytes}")
                    break
                out_keys.append(key)
                metadata.append(row["meta"] or None)
                vectors.append(np.asarray(row["vector"], np.float32))
                pixels.append(_pixels(row, fields[2:], shape))
            else:
                continue
            break
        return ExportPage(
            count, offset, out_keys, metadata,
            np.stack(vectors) if vectors else np.empty((0, gallery.dim), np.float32),
            np.stack(pixels) if pixels else np.empty((0, *(shape or [0])), np.uint8), shape)

    def vectors(self, name: str) -> tuple[list[str], np.ndarray, list[Any]]:
        """(keys in insertion order, their vectors, their metadata): what an audit reads."""
        gallery = self.get(name)
        keys = self.keys(name)
        rows = self._fetch(gallery, keys, ["vector", "meta"])
        keys = [k for k in keys if k in rows]
        vectors = np.array([rows[k]["vector"] for k in keys], np.float32).reshape(-1, gallery.dim)
        return keys, vectors, [_metadata(rows[k]["meta"]) for k in keys]

    def close(self) -> None:
        self.client.close()


def _counts(keys: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return out


def _metadata(text: str, raw: bool = False) -> Any:
    if not text:
        return None
    return text if raw else json.loads(text)


def _pixels(row: dict, fields: list[str], shape: list[int] | None) -> np.ndarray:
    data = base64.b64decode("".join(row[f] for f in fields))
    return np.frombuffer(data, np.uint8).reshape(shape or [0])
