"""Job records and their leases: who may run a job, when a job's runner counts as lost, and what
the sweep does then (queue it again, or fail it), on real files and real processes."""

import json
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from byorl.service.settings import Settings
from byorl.service.storage.job_store import JobStore, LeaseLost
from byorl.service.storage.leases import runner_identity


def dead_runner() -> dict:
    """The identity of a process that has exited (in this pid namespace)."""
    out = subprocess.run([sys.executable, "-c", "import json; from byorl.service.storage.leases "
                          "import runner_identity; print(json.dumps(runner_identity()))"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def far_runner() -> dict:
    """A runner in another pid namespace (another container or host): only its heartbeat
    tells whether it lives."""
    return {**runner_identity(), "pidns": "pid:[1]"}


@pytest.fixture
def jobs(service_db, tmp_path) -> JobStore:
    return JobStore(service_db, tmp_path, lease_s=60, max_attempts=3, time_limit_s=3600)


def test_a_job_is_claimed_once_while_its_runner_lives(jobs):
    job_id = jobs.create("audit", {})["id"]
    first = runner_identity()
    assert jobs.claim(job_id, first)["attempts"] == 1
    assert jobs.claim(job_id, runner_identity()) is None  # a duplicate delivery: skipped
    assert jobs.get(job_id)["runner"]["token"] == first["token"]
    jobs.update(job_id, first, state="succeeded", result={"ok": 1})
    assert jobs.claim(job_id, runner_identity()) is None  # finished: never runs again
    assert jobs.get(job_id)["attempts"] == 1


def test_a_gone_runner_loses_its_lease_at_once_and_a_silent_one_after_the_lease(jobs):
    gone, far = jobs.create("audit", {})["id"], jobs.create("audit", {})["id"]
    jobs.claim(gone, dead_runner())
    jobs.claim(far, far_runner())
    assert jobs.lapsed(jobs.get(gone))  # its process has exited: no need to wait
    assert not jobs.lapsed(jobs.get(far))  # its heartbeat is fresh
    job = jobs.get(far)
    assert jobs.lapsed({**job, "heartbeat_at": time.time() - 61})
    assert jobs.claim(gone, runner_identity())["attempts"] == 2


def test_the_sweep_queues_lost_jobs_again_and_fails_hopeless_ones(jobs):
    lost, live, over, spent, done = (jobs.create("audit", {})["id"] for _ in range(5))
    for job_id in (lost, over, spent):
        jobs.claim(job_id, dead_runner())
    old = jobs.get(lost)["runner"]
    jobs.claim(live, runner_identity())
    jobs.update(over, started_at=time.time() - 3601)  # ran past the time limit, then died
    jobs.update(spent, attempts=3)
    jobs.claim(done, runner_identity())
    jobs.update(done, state="succeeded")

    submitted = []
    assert jobs.sweep(submitted.append) == [lost] and submitted == [lost]
    job = jobs.get(lost)
    assert job["state"] == "queued" and "attempt 1 lost its worker" in job["stage"]
    with pytest.raises(LeaseLost):  # the presumed-dead runner can record nothing now
        jobs.update(lost, old, state="succeeded")
    assert jobs.get(live)["state"] == "running" and jobs.get(done)["state"] == "succeeded"
    assert "time limit of 3600 s" in jobs.get(over)["error"]
    assert jobs.get(spent)["state"] == "failed" and "3 attempts" in jobs.get(spent)["error"]
    assert jobs.sweep(submitted.append) == []  # nothing left to sweep


def test_a_job_out_of_attempts_fails_when_delivered_again(jobs):
    job_id = jobs.create("audit", {})["id"]
    for _ in range(3):
        jobs.claim(job_id, dead_runner())
    assert jobs.claim(job_id, runner_identity()) is None
    job = jobs.get(job_id)
    assert job["state"] == "failed" and job["attempts"] == 3 and "lost" in job["error"]


def test_a_failed_sweep_submission_leaves_the_job_for_the_next_sweep(jobs):
    job_id = jobs.create("audit", {})["id"]
    jobs.claim(job_id, dead_runner())

    def broker_down(_):
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        jobs.sweep(broker_down)
    assert jobs.get(job_id)["state"] == "running" and jobs.lapsed(jobs.get(job_id))


def test_the_lease_outlasts_several_heartbeats():
    with pytest.raises(ValidationError, match="at least 3 heartbeats"):
        Settings(job_heartbeat_s=30, job_lease_s=60)
    s = Settings()
    assert s.job_lease_s + s.job_sweep_s <= 300  # a lost job runs again within 5 minutes


def test_a_job_killed_past_its_time_limit_is_not_run_again_when_delivered_again(jobs):
    job_id = jobs.create("audit", {})["id"]
    jobs.claim(job_id, dead_runner())
    jobs.update(job_id, started_at=time.time() - 3601)
    assert jobs.claim(job_id, runner_identity()) is None
    assert "time limit" in jobs.get(job_id)["error"] and jobs.get(job_id)["attempts"] == 1


RACER = """
import json, sys
from pathlib import Path
from byorl.service.storage.database import Database
from byorl.service.storage.job_store import JobStore
from byorl.service.storage.leases import runner_identity
url, data, what, ids = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
jobs = JobStore(Database(url), data, lease_s=60)
sys.stdin.readline()  # start together
if what == "claim":
    print(json.dumps([i for i in ids if jobs.claim(i, runner_identity()) is not None]), flush=True)
else:
    print(json.dumps(jobs.sweep(lambda _: None)), flush=True)
sys.stdin.readline()  # live on until every racer is done: a claimant that exits is a lost
                      # runner, whose jobs the others may rightly claim again
"""


def race(jobs: JobStore, what: str, ids: list[str], processes: int = 4) -> list[list[str]]:
    """`what` ("claim" each job, or "sweep") in several processes at once, as api replicas and
    workers on other machines would: what each one got."""
    racers = [subprocess.Popen([sys.executable, "-c", RACER, jobs.db.url, str(jobs.root.parent),
                                what, ",".join(ids)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in racers:
        p.stdin.write("go\n")
        p.stdin.flush()
    got = [json.loads(p.stdout.readline()) for p in racers]
    for p in racers:
        p.communicate("done\n", timeout=120)
    return got


def test_racing_claims_start_each_job_once(jobs):
    ids = [jobs.create("audit", {})["id"] for _ in range(20)]
    won = race(jobs, "claim", ids)
    assert sorted(i for got in won for i in got) == sorted(ids)  # each job by one claimant
    assert {jobs.get(i)["attempts"] for i in ids} == {1}


def test_racing_sweepers_queue_each_lost_job_once(jobs):
    """Every api replica sweeps: a lost job is queued again by one of them, once."""
    ids = [jobs.create("audit", {})["id"] for _ in range(20)]
    for job_id in ids:
        jobs.claim(job_id, dead_runner())
    swept = race(jobs, "sweep", ids)
    assert sorted(i for got in swept for i in got) == sorted(ids)
    assert {jobs.get(i)["state"] for i in ids} == {"queued"}
