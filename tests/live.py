"""Real servers for tests: free ports, polling, and the api under uvicorn in its own process."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_process(argv: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    """A process in its own session (so that it and its children are killed as one group)."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(30)


def uvicorn_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "byorl.service.main:app", "--host", "127.0.0.1",
            "--port", str(port)]


def wait_ready(url: str, timeout: float = 300) -> None:
    def ready():
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, timeout, f"the api at {url}")


def postgres_binary(name: str) -> str:
    """A PostgreSQL server program: on PATH, or where Debian's `postgresql` package puts it."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, (f"the tests need PostgreSQL's {name}: apt-get install --no-install-recommends "
                   "postgresql (.ci/run installs it as root)")
    return found


def start_postgres(log: Path) -> tuple[str, subprocess.Popen, Path]:
    """A private PostgreSQL server (initdb into a fresh directory, a free port, trust auth on
    127.0.0.1 only): its URL, its process and its directory. Run as the `postgres` user when
    this is root (PostgreSQL refuses to run as root)."""
    root = Path(tempfile.mkdtemp(prefix="byorl-pg-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, postgres_binary("initdb"), "-D", str(data), "-U", "byorl",
                    "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    proc = start_process([*as_user, postgres_binary("postgres"), "-D", str(data), "-p",
                          str(port), "-k", str(root), "-c", "listen_addresses=127.0.0.1",
                          "-c", "fsync=off", "-c", "max_connections=200"], dict(os.environ),
                         log, root)
    url = f"postgresql://byorl@127.0.0.1:{port}/postgres"

    def accepting():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return subprocess.run([postgres_binary("pg_isready"), "-h", "127.0.0.1", "-p",
                                       str(port)], capture_output=True).returncode == 0
        except OSError:
            return False

    wait_for(accepting, 60, f"PostgreSQL on port {port} (log: {log})")
    return url, proc, root
