"""Audit reports on disk: saved whole, read back, never found outside their folder."""

import pytest

from byorl.service.exceptions import NotFound
from byorl.service.storage.report_store import ReportStore


def test_a_saved_report_reads_back_from_another_store(tmp_path):
    report = {"kind": "robustness", "robust_accuracy": 0.25, "mode": "full"}
    ReportStore(tmp_path).save("a1", report)
    assert ReportStore(tmp_path).get("a1") == report


def test_unknown_and_malformed_ids_are_not_found(tmp_path):
    reports = ReportStore(tmp_path)
    (tmp_path / "secret.json").write_text("{}")
    for audit_id in ("missing", "../secret", "a/b"):
        with pytest.raises(NotFound) as info:
            reports.get(audit_id)
        assert info.value.code == "audit_not_found"
