"""The registry of users' ONNX encoders (POST /models) in the service's database (`database.py`):
a row per model id with its name, card, the sha256 of its ONNX file, when it was registered,
its state (`available` or `deleted`) and where its files lie (a folder relative to the data
directory: `models/<model_id>/`, encoder.onnx + card.json, written once).

Every api replica and worker reads this table: it is what says which user models exist. The
files stay on the shared data directory (as job inputs do): ONNX Runtime and onnx2torch open a
path, up to MAX_MODEL_BYTES (64 MiB) per model; a row would carry them to every reader.

Registering and deleting change the row and the files in one transaction: the folder is
renamed into place (or away) while the transaction holds the row (PostgreSQL: the new row's
unique key or `FOR UPDATE`; SQLite: the write lock), so a model is visible to others exactly
when its files are in place, and of concurrent registrations of one model id exactly one wins
(the database's primary key decides, not the rename).
"""

import json
import time
from collections.abc import Callable

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from byorl.service.exceptions import Conflict, NotFound, TooLarge
from byorl.service.names import check_name
from byorl.service.storage.database import MODELS, Database

AVAILABLE, DELETED = "available", "deleted"


def exists(model_id: str) -> Conflict:
    return Conflict(f"model {model_id!r} (the same name and file) is already registered",
                    "model_exists")


def _record(row) -> dict:
    return {"model_id": row.id, "name": row.name, "card": json.loads(row.card),
            "onnx_sha256": row.onnx_sha256, "created_at": row.created_at, "state": row.state,
            "path": row.path}


class ModelStore:
    def __init__(self, db: Database):
        self.db = db

    def register(self, card: dict, path: str, place: Callable[[], None] | None = None,
                 max_models: int | None = None) -> None:
        """Register the model of `card` (its files at `path`, relative to the data directory);
        `place()` (which puts the files there) runs inside the transaction, before it commits:
        when it raises, nothing is registered. 409 `model_exists` when the model id is
        registered already (also for a concurrent registration of it that committed first);
        413 `too_many_models` past `max_models` available models. A deleted model's row is
        taken over by a registration of the same file (another file under its id: 409)."""
        model_id = card["model_id"]
        try:
            with self.db.transaction() as conn:
                if max_models is not None:
                    count = conn.execute(select(func.count()).select_from(MODELS)
                                         .where(MODELS.c.state == AVAILABLE)).scalar()
                    if count >= max_models:
                        raise TooLarge("too_many_models", f"{count} user models are registered "
                                       "(MAX_USER_MODELS): delete one first")
                values = {"name": card.get("name", model_id), "card": json.dumps(card),
                          "onnx_sha256": card["onnx_sha256"], "state": AVAILABLE,
                          "created_at": card.get("created_at", time.time()), "path": path,
                          "deleted_at": None}
                row = conn.execute(select(MODELS.c.state, MODELS.c.onnx_sha256)
                                   .where(MODELS.c.id == model_id).with_for_update()).first()
                if row is None:
                    conn.execute(insert(MODELS).values(id=model_id, **values))
                elif row.state != DELETED:
                    raise exists(model_id)
                elif row.onnx_sha256 != card["onnx_sha256"]:
                    # the id (name + 8 hex digits of the sha256) of a deleted model, another
                    # file: refused, so that a cache keyed by the id never serves the old one
                    raise Conflict(f"model id {model_id!r} belonged to another file (deleted): "
                                   "choose another name", "model_exists")
                else:
                    conn.execute(update(MODELS).where(MODELS.c.id == model_id).values(**values))
                if place is not None:
                    place()
        except IntegrityError:  # a concurrent registration inserted the same id first
            raise exists(model_id) from None

    def adopt(self, card: dict, path: str) -> bool:
        """Register a model folder found on disk without a row (stored before the registry
        existed); False when the id has a row already (available or deleted)."""
        try:
            with self.db.transaction() as conn:
                if conn.execute(select(MODELS.c.id).where(MODELS.c.id == card["model_id"])
                                ).first() is not None:
                    return False
                conn.execute(insert(MODELS).values(
                    id=card["model_id"], name=card.get("name", card["model_id"]),
                    card=json.dumps(card), onnx_sha256=card["onnx_sha256"],
                    created_at=card.get("created_at", 0.0), state=AVAILABLE, path=path))
            return True
        except IntegrityError:
            return False

    def delete(self, model_id: str, remove: Callable[[str], None] | None = None) -> dict:
        """Mark an available model deleted (404 `model_not_found` otherwise); `remove(path)`
        (which takes its files away) runs inside the transaction. Its record, as it was."""
        with self.db.transaction() as conn:
            row = conn.execute(select(MODELS).where(MODELS.c.id == check_name(model_id, "model"))
                               .where(MODELS.c.state == AVAILABLE).with_for_update()).first()
            if row is None:
                raise NotFound("model", model_id)
            conn.execute(update(MODELS).where(MODELS.c.id == model_id)
                         .values(state=DELETED, deleted_at=time.time()))
            if remove is not None:
                remove(row.path)
        return _record(row)

    def get(self, model_id: str) -> dict | None:
        """The record of an available model; None for an unknown or deleted one (or an id that
        is no valid name)."""
        try:
            check_name(model_id, "model")
        except NotFound:
            return None
        with self.db.read() as conn:
            row = conn.execute(select(MODELS).where(MODELS.c.id == model_id)
                               .where(MODELS.c.state == AVAILABLE)).first()
        return None if row is None else _record(row)

    def available(self) -> list[dict]:
        """The available models' records, oldest registration first."""
        with self.db.read() as conn:
            rows = conn.execute(select(MODELS).where(MODELS.c.state == AVAILABLE)
                                .order_by(MODELS.c.created_at, MODELS.c.id))
            return [_record(r) for r in rows]

    def known(self) -> set[str]:
        """Every model id with a row, available or deleted."""
        with self.db.read() as conn:
            return set(conn.execute(select(MODELS.c.id)).scalars())

    def count(self) -> int:
        with self.db.read() as conn:
            return conn.execute(select(func.count()).select_from(MODELS)
                                .where(MODELS.c.state == AVAILABLE)).scalar()
