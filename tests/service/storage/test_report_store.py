"""Audit reports in the service's database (both back-ends): saved whole, read back by another
connection, replaced when a job runs again."""

import pytest

from byorl.service.exceptions import NotFound
from byorl.service.storage.database import Database
from byorl.service.storage.report_store import ReportStore


def test_a_saved_report_reads_back_from_another_store(service_db):
    report = {"kind": "robustness", "robust_accuracy": 0.25, "mode": "full"}
    ReportStore(service_db).save("a1", report)
    assert ReportStore(Database(service_db.url)).get("a1") == report
    ReportStore(service_db).save("a1", report | {"robust_accuracy": 0.5})  # a job run again
    assert ReportStore(service_db).get("a1")["robust_accuracy"] == 0.5


def test_unknown_and_malformed_ids_are_not_found(service_db):
    reports = ReportStore(service_db)
    for audit_id in ("missing", "../secret", "a/b", ""):
        with pytest.raises(NotFound) as info:
            reports.get(audit_id)
        assert info.value.code == "audit_not_found"
