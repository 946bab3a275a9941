"""Fitted linear heads, the product of `POST /linear-head` jobs, in the service's database
(`database.py`): a row per head with its card (classes, model, threat model, metrics) and its
weights (npz: weight (classes, dim) and bias), written in one transaction, so that a head
exists whole or not at all, for every replica at once."""

import io
import json

import numpy as np
from sqlalchemy import delete, insert, select

from byorl.files import read_npz
from byorl.service.exceptions import NotFound
from byorl.service.names import check_name
from byorl.service.storage.database import HEADS, Database


class HeadStore:
    def __init__(self, db: Database):
        self.db = db

    def save(self, head_id: str, weight: np.ndarray, bias: np.ndarray, card: dict) -> None:
        """Store a head; a job that runs again (its first runner was lost) replaces it."""
        buf = io.BytesIO()
        np.savez(buf, weight=weight, bias=bias)
        with self.db.transaction() as conn:
            conn.execute(delete(HEADS).where(HEADS.c.id == head_id))
            conn.execute(insert(HEADS).values(id=head_id, created_at=card["created_at"],
                                              card=json.dumps(card), weights=buf.getvalue()))

    def card(self, head_id: str) -> dict:
        return json.loads(self._column(HEADS.c.card, head_id))

    def weights(self, head_id: str) -> tuple[np.ndarray, np.ndarray]:
        w = read_npz(io.BytesIO(self._column(HEADS.c.weights, head_id)))
        return w["weight"], w["bias"]

    def list(self) -> list[dict]:
        with self.db.read() as conn:
            cards = conn.execute(select(HEADS.c.card).order_by(HEADS.c.created_at, HEADS.c.id))
            return [json.loads(c) for c in cards.scalars()]

    def delete(self, head_id: str) -> None:
        with self.db.transaction() as conn:
            gone = conn.execute(delete(HEADS).where(HEADS.c.id == check_name(head_id, "head")))
            if gone.rowcount == 0:
                raise NotFound("head", head_id)

    def _column(self, column, head_id: str):
        with self.db.read() as conn:
            value = conn.execute(select(column).where(HEADS.c.id == check_name(head_id, "head")))
            value = value.scalar()
        if value is None:
            raise NotFound("head", head_id)
        return value
