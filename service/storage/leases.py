"""Who runs a job, and whether it still does.

A runner (the process running a job) claims the job's lease in the job record and renews it with
a heartbeat every few seconds. The lease lapses when the heartbeat stops for longer than the
lease (whatever killed the runner: a SIGKILL of a whole Celery worker, a lost container or
host) or, sooner, when the runner's process is seen to be gone (possible where it ran in the
observer's process namespace: the same host or container). The api's sweeper queues a job whose
lease lapsed again (`JobStore.sweep`), and a runner that lost its lease can no longer write the
record: a job completes once.
"""

import logging
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (command) "
    return fields[0], int(fields[19])


def _pid_namespace() -> str | None:
    """This process's pid namespace, when /proc shows it as it numbers processes."""
    try:
        if int(Path("/proc/self").resolve().name) != os.getpid():
            return None
        return os.readlink("/proc/self/ns/pid")
    except (OSError, ValueError):
        return None


def runner_identity() -> dict:
    """A fresh runner: a token unique to this claim, and how to find its process again."""
    stat = _stat("self")
    return {"token": uuid.uuid4().hex, "pid": os.getpid(), "pidns": _pid_namespace(),
            "start": stat and stat[1]}


def runner_gone(runner: dict) -> bool:
    """True when the runner's process is known to be gone (exited, a zombie, or its pid reused);
    False when it lives or cannot be seen from here (another host or container)."""
    if runner.get("pidns") is None or runner["pidns"] != _pid_namespace():
        return False
    stat = _stat(runner["pid"])
    return stat is None or stat[0] == "Z" or stat[1] != runner["start"]


class Heartbeat(threading.Thread):
    """Calls `beat()` every `every_s` seconds until stopped; `lost` once beat raised `lost_on`
    (the lease was taken from this runner: it must stop)."""

    def __init__(self, beat: Callable[[], object], every_s: float,
                 lost_on: type[Exception]):
        super().__init__(daemon=True, name="job-heartbeat")
        self.beat, self.every_s, self.lost_on = beat, every_s, lost_on
        self.lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            try:
                self.beat()
            except self.lost_on:
                self.lost = True
                return
            except OSError as exc:  # a full or flaky disk: try again at the next beat
                log.warning("job heartbeat failed: %r", exc)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
