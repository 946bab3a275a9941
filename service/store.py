"""The data directory: jobs, their inputs, fitted heads and audit reports, written atomically.

The api and the workers share this directory (a volume) and nothing else, so everything a job
needs or produces lives here:

    jobs/<id>/job.json      state, progress, params, result (rewritten whole, atomically)
    jobs/<id>/input.npz     the submitted pixels (uint8) and labels
    heads/<id>/head.npz     weight (classes, dim) and bias of a fitted linear head
    heads/<id>/head.json    classes, model, threat model, metrics (written last: the head exists)
    audits/<id>.json        an audit report
"""

import io
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from index.files import atomic_write

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STATES = ("queued", "running", "succeeded", "failed")


class NotFound(LookupError):
    """An id or name that the data directory does not hold."""

    def __init__(self, kind: str, name: str):
        super().__init__(f"unknown {kind} {name!r}")
        self.kind = kind


class Conflict(ValueError):
    """A request that contradicts what is stored (a name already taken)."""


def check_name(name: str, kind: str) -> str:
    """Ids and names become file names: allow no path tricks."""
    if not NAME.match(name):
        raise NotFound(kind, name)
    return name


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, [json.dumps(obj, indent=1).encode()])


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, [buf.getbuffer()])


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


class JobStore:
    """Job records. `lost_after_s`: a job still "running" this long after its start is reported
    failed: its process was killed past the hard time limit (Celery acknowledges such a job and
    never runs it again), and a dead worker's job is redelivered, restarting the clock, sooner."""

    def __init__(self, root: Path, lost_after_s: float | None = None):
        self.root = Path(root) / "jobs"
        self.lost_after_s = lost_after_s

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
        return self._seen(self._read(job_id))

    def _read(self, job_id: str) -> dict:
        path = self.root / check_name(job_id, "job") / "job.json"
        if not path.exists():
            raise NotFound("job", job_id)
        return read_json(path)

    def _seen(self, job: dict) -> dict:
        """The record as clients see it: a lost job reads as failed (the file is not changed,
        so a runner that does come back still owns the record)."""
        started = job.get("started_at")
        if (job["state"] == "running" and self.lost_after_s is not None and started is not None
                and time.time() - started > self.lost_after_s):
            return {**job, "state": "failed", "stage": "failed",
                    "error": f"no result {self.lost_after_s:.0f} s after the start: the job's "
                             "process was killed past the hard time limit or lost"}
        return job

    def update(self, job_id: str, **fields) -> dict:
        """Rewrite the record; only the job's runner writes after creation, so no lost update."""
        job = {**self._read(job_id), **fields}
        write_json(self.root / job_id / "job.json", job)
        return job

    def inputs(self, job_id: str) -> dict[str, np.ndarray]:
        return read_npz(self.root / check_name(job_id, "job") / "input.npz")

    def list(self) -> list[dict]:
        jobs = [self._seen(read_json(p)) for p in self.root.glob("*/job.json")]
        return sorted(jobs, key=lambda j: j["created_at"])


class HeadStore:
    def __init__(self, root: Path):
        self.root = Path(root) / "heads"

    def save(self, head_id: str, weight: np.ndarray, bias: np.ndarray, card: dict) -> None:
        write_npz(self.root / head_id / "head.npz", weight=weight, bias=bias)
        write_json(self.root / head_id / "head.json", card)

    def card(self, head_id: str) -> dict:
        path = self.root / check_name(head_id, "head") / "head.json"
        if not path.exists():
            raise NotFound("head", head_id)
        return read_json(path)

    def weights(self, head_id: str) -> tuple[np.ndarray, np.ndarray]:
        self.card(head_id)
        w = read_npz(self.root / head_id / "head.npz")
        return w["weight"], w["bias"]

    def list(self) -> list[dict]:
        cards = [read_json(p) for p in self.root.glob("*/head.json")]
        return sorted(cards, key=lambda c: c["created_at"])

    def delete(self, head_id: str) -> None:
        path = self.root / check_name(head_id, "head") / "head.json"
        if not path.exists():
            raise NotFound("head", head_id)
        path.unlink()  # the head is gone the moment its card is
        shutil.rmtree(path.parent, ignore_errors=True)


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
