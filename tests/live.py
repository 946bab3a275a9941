"""Real servers for tests: free ports, polling, and the api under uvicorn in its own process."""

import base64
import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image


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


def start_service(model_dir, tmp: Path, **settings) -> tuple[str, subprocess.Popen]:
    """The service on a free port, as a user runs it: uvicorn, jobs in its own processes (no
    Redis), one inference thread, `tmp/data` as its data directory, `settings` as BYORL_
    variables. Its URL and process (stop it with `kill_group`)."""
    env = {**os.environ, "BYORL_MODEL_DIR": str(model_dir), "BYORL_DATA_DIR": str(tmp / "data"),
           "BYORL_REDIS_URL": "", "BYORL_THREADS": "1",
           **{f"BYORL_{k.upper()}": str(v) for k, v in settings.items()}}
    port = free_port()
    proc = start_process(uvicorn_argv(port), env, tmp / "api.log", tmp)
    wait_ready(f"http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{port}", proc


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


# A worker alone in a pid namespace, as in its own container: the api cannot see its processes.
ISOLATED = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]


class Stack:
    """The deployed service, natively: redis-server, api replicas (uvicorn) and Celery workers
    on one data directory (and one database, when `database_url` is given), each in its own
    process group (killed whole)."""

    def __init__(self, tmp: Path, model_dir: Path, database_url: str = "", **settings: str):
        self.tmp, self.redis_port, self.api_port = tmp, free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"  # the replica named "api"
        self.env = {
            **os.environ, "OMP_NUM_THREADS": "1", "BYORL_THREADS": "1",
            "BYORL_MODEL_DIR": str(model_dir), "BYORL_DATA_DIR": str(tmp / "data"),
            "BYORL_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "BYORL_DATABASE_URL": database_url,
            **{f"BYORL_{k.upper()}": v for k, v in settings.items()},
        }
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.procs[name] = start_process(argv, self.env, self.tmp / f"{name}.log", self.tmp)
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        kill_group(self.procs.pop(name), sig)

    def start_redis(self) -> None:
        self.start("redis", ["redis-server", "--port", str(self.redis_port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(self.tmp)])
        wait_for(lambda: b"PONG" in subprocess.run(
            ["redis-cli", "-p", str(self.redis_port), "ping"], capture_output=True).stdout,
            30, "redis")

    def start_api(self, name: str = "api") -> str:
        """An api replica (the one named "api" on `self.url`'s port): its URL."""
        port = self.api_port if name == "api" else free_port()
        self.start(name, uvicorn_argv(port))
        wait_ready(url := f"http://127.0.0.1:{port}")
        return url

    def start_worker(self, name: str, isolated: bool = False) -> None:
        self.start(name, (ISOLATED if isolated else []) + [
            sys.executable, "-m", "celery", "-A", "byorl.service.worker", "worker", "--pool",
            "prefork", "--concurrency", "1", "--loglevel", "INFO", "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle"])
        wait_for(lambda: " ready." in self.log(name), 300, f"worker {name}")

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)
def tiny_huge_webp() -> str:
    """A lossless WebP of 4096x4096 white pixels: 944 base64 characters, 16.8 Mpixels."""
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (255, 255, 255)).save(buf, format="WEBP", lossless=True)
    return base64.b64encode(buf.getvalue()).decode()


def healthz_during(url: str, request) -> tuple[httpx.Response, float, float]:
    """(the answer of `request()`, its seconds, the longest /healthz wait meanwhile): how long
    the server's event loop was blocked while it handled the request."""
    waits, done = [0.0], threading.Event()

    def poll():
        while not done.is_set():
            start = time.monotonic()
            httpx.get(url + "/healthz", timeout=300)
            waits.append(time.monotonic() - start)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.monotonic()
    try:
        answer = request()
    finally:
        took = time.monotonic() - start
        done.set()
        poller.join()
    return answer, took, max(waits)


MILVUS_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord",
                     "dataNode")


def start_milvus(root: Path):
    """The real Milvus standalone server (the `milvus` package's binary) with its data in
    `root`, every component listening on 127.0.0.1: (its URI, the server). It binds about 12
    ports (19530, 2379, 9091, ...): one per machine, shared by a whole test session."""
    try:
        from milvus import MilvusServer
    except ImportError:
        raise AssertionError("the tests need the Milvus server: pip install -e '.[dev]' "
                             "(milvus==2.3.5)") from None
    server = MilvusServer(wait_for_started=False)
    server.set_base_dir(str(root))
    for component in MILVUS_COMPONENTS:
        server.config.extra_configs[f"{component}.ip"] = "127.0.0.1"
    try:
        server.start()
        server.wait_started(timeout=180_000)
    except Exception as exc:
        logs = root / "logs" / "milvus-stderr.log"
        tail = logs.read_text(errors="replace")[-2000:] if logs.exists() else ""
        server.stop()
        raise AssertionError(f"the Milvus server did not start ({type(exc).__name__}: {exc}); "
                             f"is another one running on this machine (ports 19530, 2379, "
                             f"9091 ...)? Its log ({logs}): {tail}") from None
    return f"http://127.0.0.1:{server.listen_port}", server
