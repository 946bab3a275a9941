"""Job records: state, progress, params, result, claims and leases, and the sweep that queues
a job again when its runner was lost. The records live in the service's database
(`database.py`: SQLite in the data directory, or PostgreSQL shared by every replica and
worker); a job's inputs are a write-once file in the shared data directory:

    jobs/<id>/input.npz     the submitted pixels (uint8) and labels

Fitted heads and audit reports, the jobs' products, have stores of their own (`head_store.py`,
`report_store.py`).
"""

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from byorl.files import read_npz, write_npz
from byorl.service.exceptions import NotFound
from byorl.service.names import check_name
from byorl.service.settings import Settings
from byorl.service.storage.database import JOBS, Database, open_database
from byorl.service.storage.leases import runner_gone


class LeaseLost(RuntimeError):
    """The runner no longer holds the job's lease: it was found lapsed and the job queued again."""


class JobStore:
    """Job records, their leases (see `leases.py`) and the sweep. Every change of a record is
    made in a transaction that holds the job's row (`FOR UPDATE`; SQLite's write lock), so the
    api's sweepers, a runner and its heartbeat never overwrite each other, on any machine."""

    def __init__(self, db: Database, data_dir: Path, lease_s: float = 60, max_attempts: int = 3,
                 time_limit_s: float | None = None):
        self.db, self.root = db, Path(data_dir) / "jobs"
        self.lease_s, self.max_attempts, self.time_limit_s = lease_s, max_attempts, time_limit_s

    @classmethod
    def from_settings(cls, s: Settings) -> "JobStore":
        return cls(open_database(s.database()), s.data_dir, s.job_lease_s, s.job_max_attempts,
                   s.job_time_limit_s)

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
        with self.db.transaction() as conn:
            conn.execute(insert(JOBS).values(id=job_id, state="queued",
                                             created_at=job["created_at"],
                                             record=json.dumps(job)))
        return job

    def get(self, job_id: str) -> dict:
        with self.db.read() as conn:
            return self._read(conn, job_id)

    def list(self) -> list[dict]:
        with self.db.read() as conn:
            rows = conn.execute(select(JOBS.c.record).order_by(JOBS.c.created_at, JOBS.c.id))
            return [json.loads(r) for r in rows.scalars()]

    def inputs(self, job_id: str) -> dict[str, np.ndarray]:
        return read_npz(self.root / check_name(job_id, "job") / "input.npz")

    def _read(self, conn: Connection, job_id: str, lock: bool = False) -> dict:
        query = select(JOBS.c.record).where(JOBS.c.id == check_name(job_id, "job"))
        record = conn.execute(query.with_for_update() if lock else query).scalar()
        if record is None:
            raise NotFound("job", job_id)
        return json.loads(record)

    @contextmanager
    def _locked(self, job_id: str) -> Iterator[tuple[Connection, dict]]:
        """The record, read in a transaction that holds its row until the block ends."""
        with self.db.transaction() as conn:
            yield conn, self._read(conn, job_id, lock=True)

    @staticmethod
    def _write(conn: Connection, job: dict) -> dict:
        conn.execute(update(JOBS).where(JOBS.c.id == job["id"])
                     .values(state=job["state"], record=json.dumps(job)))
        return job

    def update(self, job_id: str, owner: dict | None = None, **fields) -> dict:
        """Change fields of the record; with `owner` (a runner), only while it holds the lease
        (else LeaseLost), and the write renews it."""
        with self._locked(job_id) as (conn, job):
            if owner is not None:
                if (job.get("runner") or {}).get("token") != owner["token"]:
                    raise LeaseLost(f"job {job_id} is no longer run by this process")
                fields["heartbeat_at"] = time.time()
            return self._write(conn, {**job, **fields})

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
        with self._locked(job_id) as (conn, job):
            if job["state"] in ("succeeded", "failed") or (
                    job["state"] == "running" and not self.lapsed(job)):
                return None
            if why := self._hopeless(job):
                self._write(conn, {**job, **_failed(why)})
                return None
            now = time.time()
            return self._write(conn, {**job, "state": "running", "stage": "starting",
                                      "progress": 0.0, "error": None,
                                      "attempts": job["attempts"] + 1, "started_at": now,
                                      "heartbeat_at": now, "runner": runner})

    def sweep(self, submit: Callable[[str], None]) -> "list[str]":  # (list: the method)
        """Queue again (with `submit`) every running job whose lease lapsed: its worker died.
        A job past its time limit or out of attempts fails instead. Returns the queued ids.
        Safe with many sweepers (api replicas): each job is taken by one of them, the others
        skip its locked row, and a requeued job is no longer running."""
        queued = []
        with self.db.read() as conn:
            running = conn.execute(select(JOBS.c.id).where(JOBS.c.state == "running"))
            candidates = list(running.scalars())
        for job_id in candidates:
            with self.db.transaction() as conn:
                query = (select(JOBS.c.record).where(JOBS.c.id == job_id,
                                                     JOBS.c.state == "running")
                         .with_for_update(skip_locked=True))
                record = conn.execute(query).scalar()
                if record is None or not self.lapsed(job := json.loads(record)):
                    continue  # another sweeper or its runner holds it, or it moved on
                if why := self._hopeless(job):
                    self._write(conn, {**job, **_failed(why)})
                    continue
                submit(job_id)  # in the transaction: no runner claims it before it reads queued
                self._write(conn, {**job, "state": "queued", "runner": None,
                                   "stage": f"queued again: attempt {job['attempts']} lost its "
                                   "worker"})
                queued.append(job_id)
        return queued


def _failed(error: str) -> dict:
    return {"state": "failed", "stage": "failed", "error": error, "runner": None,
            "finished_at": time.time()}
