"""Job records: a job whose process was killed past the hard time limit reads as failed instead
of "running" forever, without its file being changed."""

import time

from service.settings import Settings
from service.store import JobStore


def test_a_job_running_past_the_lost_limit_reads_as_failed(tmp_path):
    raw, store = JobStore(tmp_path), JobStore(tmp_path, lost_after_s=100)
    now = time.time()
    lost = raw.create("audit", {})["id"]
    raw.update(lost, state="running", started_at=now - 101)
    fresh = raw.create("audit", {})["id"]
    raw.update(fresh, state="running", started_at=now - 5)
    done = raw.create("audit", {})["id"]
    raw.update(done, state="succeeded", started_at=now - 1000)

    job = store.get(lost)
    assert job["state"] == "failed" and "hard time limit" in job["error"]
    assert store.get(fresh)["state"] == "running" and store.get(done)["state"] == "succeeded"
    assert {j["id"]: j["state"] for j in store.list()} == {
        lost: "failed", fresh: "running", done: "succeeded"}
    assert raw.get(lost)["state"] == "running"  # the record itself is untouched


def test_lost_limit_outlasts_the_hard_limit_and_redelivery():
    s = Settings(job_time_limit_s=600)
    assert s.job_time_limit_s < s.job_kill_after_s < s.visibility_timeout_s < s.job_lost_after_s


def test_the_api_reports_a_lost_job_as_failed(client, settings):
    job_id = JobStore(settings.data_dir).create("audit", {})["id"]
    JobStore(settings.data_dir).update(job_id, state="running", started_at=time.time() - 10**7)
    body = client.get(f"/jobs/{job_id}").json()
    assert body["state"] == "failed" and "hard time limit" in body["error"]
