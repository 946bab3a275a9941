"""The records that several processes change (jobs with their claims and leases, fitted heads,
audit reports, the registry of users' models) in one SQL database, through one code path
(SQLAlchemy Core) for both dialects:

- embedded (default): SQLite, `byorl.db` in the data directory (WAL, so the api and its job
  processes read while one writes; a write transaction takes the write lock at its start);
- shared (`BYORL_DATABASE_URL=postgresql://...`): PostgreSQL, so that any number of api
  replicas and workers on any machines share them; a claim or a sweep locks the job's row
  (`SELECT ... FOR UPDATE`, `SKIP LOCKED` in the sweep).

Galleries on Milvus keep their catalog and keys here too (`GALLERIES`, `GALLERY_ITEMS`).

The schema is versioned: `MIGRATIONS` holds every step in order, `schema_version` how many
have run; each process runs the missing ones at start, one process at a time.

Job inputs stay files (write-once, in the shared data directory, `jobs/<id>/input.npz`): a
request may hold 10,000 images of a user model's input size, GBs that a database row should
not carry; their record, which every process changes, lives here.
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

SQLITE_BUSY_MS = 30_000  # a writer waits this long for another's transaction to end

METADATA = MetaData()
JOBS = Table(
    "jobs", METADATA,
    Column("id", String(64), primary_key=True),
    Column("state", String(16), nullable=False, index=True),
    Column("created_at", Float, nullable=False, index=True),
    Column("record", Text, nullable=False),  # the whole job record as JSON
)
HEADS = Table(
    "heads", METADATA,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False, index=True),
    Column("card", Text, nullable=False),
    Column("weights", LargeBinary, nullable=False),  # npz: weight (classes, dim), bias
)
REPORTS = Table(
    "reports", METADATA,
    Column("id", String(64), primary_key=True),
    Column("report", Text, nullable=False),
)
# Users' ONNX encoders (POST /models), the registry every replica and worker reads
# (`model_store.py`): the card and sha256 here, the write-once files in the shared data
# directory (`path`, relative to DATA_DIR). A deleted model keeps its row (state "deleted").
MODELS = Table(
    "models", METADATA,
    Column("id", String(64), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("card", Text, nullable=False),
    Column("onnx_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False, index=True),
    Column("state", String(16), nullable=False, index=True),  # available | deleted
    Column("path", String(512), nullable=False),
    Column("deleted_at", Float),
)
SCHEMA_VERSION = Table("schema_version", METADATA, Column("version", Integer, nullable=False))
# Galleries on Milvus (service/storage/milvus_galleries.py): the catalog, and each item's key
# with its insertion sequence (`id`): duplicate keys are refused here (Milvus takes them), and
# pages follow insertion order (Milvus pages by primary key).
GALLERIES = Table(
    "galleries", METADATA,
    Column("name", String(128), primary_key=True),
    Column("model_id", String(256), nullable=False),
    Column("dim", Integer, nullable=False),
    Column("factory", String(64), nullable=False),
    Column("collection", String(255), nullable=False, unique=True),
    Column("pixel_shape", Text),  # JSON list, set by the first add
    Column("pixel_fields", Integer, nullable=False),  # VARCHAR fields that hold the pixels
    Column("created_at", Float, nullable=False),
)
GALLERY_ITEMS = Table(
    "gallery_items", METADATA,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("gallery", String(128), nullable=False),
    Column("key", String(1024), nullable=False),
    UniqueConstraint("gallery", "key"),
)


def _v1(conn: Connection) -> None:
    for table in (JOBS, HEADS, REPORTS):
        table.create(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    MODELS.create(conn, checkfirst=True)


def _v3(conn: Connection) -> None:
    for table in (GALLERIES, GALLERY_ITEMS):
        table.create(conn, checkfirst=True)
    conn.execute(text("CREATE INDEX IF NOT EXISTS gallery_items_order ON gallery_items "
                      "(gallery, id)"))


# Every schema change, in order; never edit a step that has shipped, append one.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3]


class Database:
    """One database of the service's shared records, migrated to the current schema."""

    def __init__(self, url: str):
        self.url = url
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})
            _sqlite_transactions(self.engine)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
        self.migrate()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in one transaction, committed when the block ends without error (on
        SQLite it holds the database's write lock from its start)."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection in one read-only transaction: a consistent view that takes no write
        lock (SQLite readers never wait for the writer)."""
        with self.engine.connect() as conn:
            conn.execution_options(read_only=True)
            with conn.begin():
                yield conn

    def migrate(self) -> int:
        """Run the migrations this database lacks, one process at a time; the schema version."""
        with self.transaction() as conn:
            if not self.sqlite:  # SQLite's write lock, taken at BEGIN, already serialises
                conn.execute(text("SELECT pg_advisory_xact_lock(7263541)"))
            SCHEMA_VERSION.create(conn, checkfirst=True)
            version = conn.execute(select(SCHEMA_VERSION.c.version)).scalar()
            if version is None:
                conn.execute(insert(SCHEMA_VERSION).values(version=0))
                version = 0
            for step in MIGRATIONS[version:]:
                step(conn)
            conn.execute(update(SCHEMA_VERSION).values(version=len(MIGRATIONS)))
        return len(MIGRATIONS)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_transactions(engine: Engine) -> None:
    """SQLite as several processes need it: WAL (readers never wait for the writer), and every
    write transaction begun with BEGIN IMMEDIATE, so that a read-then-write (a claim) holds the
    write lock from its start and two processes never both read 'queued' (SQLAlchemy's
    documented recipe: the driver's own transaction handling off, ours on)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _):
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")

    @event.listens_for(engine, "begin")
    def _begin(conn):
        read_only = conn.get_execution_options().get("read_only")
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


_OPEN: dict[str, Database] = {}


def open_database(url: str) -> Database:
    """The process's one `Database` per URL (engines pool connections; job functions, which
    run many times per process, share it)."""
    if url not in _OPEN:
        _OPEN[url] = Database(url)
    return _OPEN[url]


def _forget_inherited_connections() -> None:
    """A forked child (a Celery pool process) must not use its parent's pooled connections:
    it opens its own, leaving the parent's to the parent (SQLAlchemy's advice for fork)."""
    for db in _OPEN.values():
        db.engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)
