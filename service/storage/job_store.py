"""Job records in the data directory: state, inputs, claims, leases and the sweep, written
atomically.

The api and the workers share this directory (a volume) and nothing else, so everything a job
needs or produces lives here:

    jobs/<id>/job.json      state, progress, params, result, lease (rewritten whole, atomically)
    jobs/<id>/lock          the lock held while the record changes (flock)
    jobs/<id>/input.npz     the submitted pixels (uint8) and labels

Fitted heads and audit reports, the jobs' products, have stores of their own (`head_store.py`,
`report_store.py`).
"""

import fcntl
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from byorl.files import read_json, read_npz, write_json, write_npz
from byorl.service.exceptions import NotFound
from byorl.service.names import check_name
from byorl.service.settings import Settings
from byorl.service.storage.leases import runner_gone


class LeaseLost(RuntimeError):
    """The runner no longer holds the job's lease: it was found lapsed and the job queued again."""


class JobStore:
    """Job records, their leases (see `service.leases`) and the sweep that queues a job again
    when its runner was lost. Every change of a record is made under the job's file lock, so
    the api's sweeper, a runner and its heartbeat never overwrite each other."""

    def __init__(self, root: Path, lease_s: float = 60, max_attempts: int = 3,
                 time_limit_s: float | None = None):
        self.root = Path(root) / "jobs"
        self.lease_s, self.max_attempts, self.time_limit_s = lease_s, max_attempts, time_limit_s

    @classmethod
    def from_settings(cls, s: Settings) -> "JobStore":
        return cls(s.data_dir, s.job_lease_s, s.job_max_attempts, s.job_time_limit_s)

    def create(self, kind: str, params: dict, **arrays: np.ndarray) -> dict:
        """A queued job whose inputs are on disk before anyone can see its id."""
        job_id = uuid.uuid4().hex
        if arrays:
            write_npz(self.root / job_id / "input.npz", **arrays)
        job = {
            "id": job_id, "kind": kind, "state": "queued", "progress": 0.0, "stage": "queued",
            "attempts": 0, "params": params, "result": None, "error": None,
            "created_at": time.time(), "started_at": None, "finished_at": None,
        }
        write_json(self.root / job_id / "job.json", job)
        return job

    def get(self, job_id: str) -> dict:
        path = self.root / check_name(job_id, "job") / "job.json"
        if not path.exists():
            raise NotFound("job", job_id)
        return read_json(path)

    def list(self) -> list[dict]:
        jobs = [read_json(p) for p in self.root.glob("*/job.json")]
        return sorted(jobs, key=lambda j: j["created_at"])

    def inputs(self, job_id: str) -> dict[str, np.ndarray]:
        return read_npz(self.root / check_name(job_id, "job") / "input.npz")

    @contextmanager
    def _locked(self, job_id: str) -> Iterator[dict]:
        """The record, read under the job's exclusive lock (held until the block ends)."""
        self.get(job_id)  # NotFound before a lock file is made
        with open(self.root / job_id / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield self.get(job_id)

    def _write(self, job: dict) -> dict:
        write_json(self.root / job["id"] / "job.json", job)
        return job

    def update(self, job_id: str, owner: dict | None = None, **fields) -> dict:
        """Change fields of the record; with `owner` (a runner), only while it holds the lease
        (else LeaseLost), and the write renews it."""
        with self._locked(job_id) as job:
            if owner is not None:
                if (job.get("runner") or {}).get("token") != owner["token"]:
                    raise LeaseLost(f"job {job_id} is no longer run by this process")
                fields["heartbeat_at"] = time.time()
            return self._write({**job, **fields})

    def lapsed(self, job: dict) -> bool:
        """A running job whose runner is gone or silent for longer than the lease."""
        runner = job.get("runner")
        return job["state"] == "running" and (
            runner is None or runner_gone(runner)
            or time.time() - job.get("heartbeat_at", 0) > self.lease_s)

    def _hopeless(self, job: dict) -> str | None:
        """Why a job not finished by its earlier runners must not run again, if so."""
        started = job["started_at"]
        if (job["state"] == "running" and self.time_limit_s is not None and started is not None
                and time.time() - started > self.time_limit_s):
            return (f"no result within the time limit of {self.time_limit_s:.0f} s: the job's "
                    "process was killed")
        if job["attempts"] >= self.max_attempts:
            return f"its runner was lost in each of its {job['attempts']} attempts"
        return None

    def claim(self, job_id: str, runner: dict) -> dict | None:
        """Start a run of the job as `runner`; None when it must not run here: it finished, or
        another runner holds a live lease (a duplicate delivery), or it is hopeless (failed)."""
        with self._locked(job_id) as job:
            if job["state"] in ("succeeded", "failed") or (
                    job["state"] == "running" and not self.lapsed(job)):
                return None
            if why := self._hopeless(job):
                self._write({**job, **_failed(why)})
                return None
            now = time.time()
            return self._write({**job, "state": "running", "stage": "starting", "progress": 0.0,
                                "error": None, "attempts": job["attempts"] + 1,
                                "started_at": now, "heartbeat_at": now, "runner": runner})

    def sweep(self, submit: Callable[[str], None]) -> "list[str]":  # (list: the method)
        """Queue again (with `submit`) every running job whose lease lapsed: its worker died.
        A job past its time limit or out of attempts fails instead. Returns the queued ids."""
        queued = []
        for job in self.list():
            if not self.lapsed(job):
                continue
            with self._locked(job["id"]) as job:
                if not self.lapsed(job):
                    continue
                if why := self._hopeless(job):
                    self._write({**job, **_failed(why)})
                    continue
                submit(job["id"])  # under the lock: no runner claims it before it reads queued
                self._write({**job, "state": "queued", "runner": None,
                             "stage": f"queued again: attempt {job['attempts']} lost its worker"})
                queued.append(job["id"])
        return queued


def _failed(error: str) -> dict:
    return {"state": "failed", "stage": "failed", "error": error, "runner": None,
            "finished_at": time.time()}
