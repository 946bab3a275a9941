"""Audit reports, the product of `POST /audits` jobs: `audits/<id>.json` in the data directory."""

from pathlib import Path

from byorl.files import read_json, write_json
from byorl.service.exceptions import NotFound
from byorl.service.names import check_name


class ReportStore:
    def __init__(self, root: Path):
        self.root = Path(root) / "audits"

    def save(self, audit_id: str, report: dict) -> None:
        write_json(self.root / f"{audit_id}.json", report)

    def get(self, audit_id: str) -> dict:
        path = self.root / f"{check_name(audit_id, 'audit')}.json"
        if not path.exists():
            raise NotFound("audit", audit_id)
        return read_json(path)
