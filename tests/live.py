"""Real servers for tests: free ports, polling, and the api under uvicorn in its own process."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
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
