"""Audit reports, the product of `POST /audits` jobs, in the service's database
(`database.py`): a row per report, its JSON whole."""

import json

from sqlalchemy import delete, insert, select

from byorl.service.exceptions import NotFound
from byorl.service.names import check_name
from byorl.service.storage.database import REPORTS, Database


class ReportStore:
    def __init__(self, db: Database):
        self.db = db

    def save(self, audit_id: str, report: dict) -> None:
        """Store a report; a job that runs again (its first runner was lost) replaces it."""
        with self.db.transaction() as conn:
            conn.execute(delete(REPORTS).where(REPORTS.c.id == audit_id))
            conn.execute(insert(REPORTS).values(id=audit_id, report=json.dumps(report)))

    def get(self, audit_id: str) -> dict:
        with self.db.read() as conn:
            query = select(REPORTS.c.report).where(REPORTS.c.id == check_name(audit_id, "audit"))
            report = conn.execute(query).scalar()
        if report is None:
            raise NotFound("audit", audit_id)
        return json.loads(report)
