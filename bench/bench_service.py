"""/embed over HTTP under 1, 8 and 32 concurrent clients against the offline ONNX Runtime batch
throughput of the same model, measured in the same run (ratio = served / offline images/s).
The offline throughput is measured again right before each level (the server idle), so a
drifting background load hits both sides of each ratio alike.

The service runs as it is deployed (uvicorn in its own process, dynamic batching on). The load
comes from `wrk` (a C load generator, one thread: it takes little of the CPU the server needs;
Debian/Ubuntu: `apt-get install wrk`), or, with `--client asyncio` or without wrk, from asyncio
tasks in this process. Either way each client sends one request after another on its own
keep-alive connection, cycling through 256 CIFAR-10 JPEGs. On a small machine the clients share
the cores with the server: the ratio is a floor. With `--peer` (wrk, one image per request), the
same load also goes to LitServe serving the same model the same way (`litserve_peer.py`), right
after each level's run of the service, while the service sits idle.

    python bench/bench_service.py --model-dir models/default
    python bench/bench_service.py --model-dir models/default --peer  # + LitServe, same run
    python bench/bench_service.py --model-dir models/default --images-per-request 4 --seconds 20
"""

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from byorl.model_dir import embed, load_onnx_session, read_card
from byorl.service.serving.images import decode_images
from byorl.service.settings import Settings

CIFAR = Path(__file__).resolve().parents[1] / "../shared/data/cifar10-jpeg.tar.gz"


def sample_images(n: int) -> list[bytes]:
    """The first n JPEGs of the shared CIFAR-10 archive (n noise PNGs when it is absent)."""
    if not CIFAR.exists():
        import io

        from PIL import Image

        rng, out = np.random.default_rng(0), []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(buf, "PNG")
            out.append(buf.getvalue())
        return out
    out = []
    with tarfile.open(CIFAR) as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".jpg"):
                out.append(tar.extractfile(m).read())
                if len(out) == n:
                    return out
    return out


def offline_throughput(session, pixels: np.ndarray, batch: int, seconds: float) -> float:
    """Images/s of ONNX Runtime alone on decoded pixels, batch after batch (best of 3)."""
    x = np.resize(pixels, (batch, *pixels.shape[1:]))
    embed(session, x, batch)
    best = 0.0
    for _ in range(3):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            embed(session, x, batch)
            done += batch
        best = max(best, done / elapsed)
    return best


async def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> list[float]:
    """Latencies (s) of all requests of `clients` closed-loop clients during `seconds`.

    Each client is a bare keep-alive HTTP/1.1 connection: a general-purpose client library
    (httpx) spends more CPU per request than the server does, on the same two cores.
    """
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = i
        while time.perf_counter() < deadline:
            body = bodies[n % len(bodies)]
            n += clients
            start = time.perf_counter()
            writer.write(b"POST /embed HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            latencies.append(time.perf_counter() - start)
        writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies


WRK_SCRIPT = """
local bodies, i = {%s}, 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/embed", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str) -> None:
    for _ in range(3000):
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within 5 minutes")


def wrk_load(port: int, bodies: list[bytes], clients: int, seconds: float,
             workdir: str) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, non-2xx answers) of `clients` wrk connections."""
    script = Path(workdir) / "embed.lua"
    script.write_text(WRK_SCRIPT % ",".join(f"[==[{b.decode()}]==]" for b in bodies))
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}/embed"],
                         capture_output=True, text=True, check=True).stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def percentile(p: str) -> float:
        value, suffix = re.search(rf"\n\s+{p}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * unit[suffix]

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rate, percentile("50"), percentile("99"), int(bad.group(1)) if bad else 0


def batch_stats(url: str) -> tuple[float, float]:
    """(images, ONNX Runtime calls) of the batcher so far, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("byorl_batch_images_sum", "byorl_batch_images_count"):
            values[name] = float(value)
    return values["byorl_batch_images_sum"], values["byorl_batch_images_count"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", default="models/default")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10, help="per concurrency level")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--client", choices=["wrk", "asyncio"],
                   default="wrk" if shutil.which("wrk") else "asyncio")
    p.add_argument("--peer", action="store_true",
                   help="also load LitServe serving the same model (litserve_peer.py; needs "
                   "litserve and wrk, one image per request)")
    args = p.parse_args()
    if args.peer and (args.client != "wrk" or args.images_per_request != 1):
        p.error("--peer needs --client wrk and --images-per-request 1")

    card = read_card(args.model_dir)
    settings = Settings(model_dir=args.model_dir, data_dir="unused", threads=args.threads)
    blobs = sample_images(256)
    pixels = decode_images(blobs, card["input_size"][-1], settings, len(blobs))
    k = args.images_per_request
    bodies = [json.dumps({"images": [base64.b64encode(b).decode() for b in blobs[i : i + k]]})
              .encode() for i in range(0, len(blobs) - k + 1, k)]

    session = load_onnx_session(args.model_dir, args.threads)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "BYORL_MODEL_DIR": str(args.model_dir), "BYORL_DATA_DIR": data,
               "BYORL_THREADS": str(args.threads), "BYORL_REDIS_URL": ""}
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "byorl.service.main:app", "--port", str(port),
             "--log-level", "warning"], env=env)
        servers = [server]
        try:
            wait_ready(url + "/readyz")
            if args.peer:
                peer_port = free_port()
                servers.append(subprocess.Popen(
                    [sys.executable, str(Path(__file__).with_name("litserve_peer.py")),
                     "--model-dir", str(args.model_dir), "--port", str(peer_port),
                     "--threads", str(args.threads)], start_new_session=True))
                wait_ready(f"http://127.0.0.1:{peer_port}/health")
                wrk_load(peer_port, bodies, 4, 1.0, data)  # warm-up
            asyncio.run(load(port, bodies, 4, 1.0))  # warm-up
            print(f"model {card['model_id']}  threads {args.threads}  offline batch and max batch "
                  f"{settings.max_batch}  wait {settings.batch_wait_ms} ms  "
                  f"{k} image(s) per request  client {args.client}")
            print(f"{'clients':>7} {'requests/s':>10} {'images/s':>9} {'p50 ms':>8} "
                  f"{'p99 ms':>8} {'mean batch':>10} {'offline img/s':>13} {'served/offline':>14}"
                  + (f" {'peer img/s':>10} {'peer p50':>8} {'served/peer':>11}" if args.peer
                     else ""))
            for clients in args.clients:
                offline = offline_throughput(session, pixels, settings.max_batch, args.seconds)
                images0, calls0 = batch_stats(url)
                if args.client == "wrk":
                    requests, p50, p99, bad = wrk_load(port, bodies, clients, args.seconds, data)
                    if bad:
                        raise RuntimeError(f"{bad} answers were not 200")
                else:
                    start = time.perf_counter()
                    lat = asyncio.run(load(port, bodies, clients, args.seconds))
                    requests = len(lat) / (time.perf_counter() - start)
                    p50, p99 = np.percentile(np.array(lat) * 1000, [50, 99])
                images1, calls1 = batch_stats(url)
                rate = requests * k
                mean_batch = (images1 - images0) / max(calls1 - calls0, 1)
                row = (f"{clients:>7} {requests:>10.1f} {rate:>9.1f} {p50:>8.1f} {p99:>8.1f} "
                       f"{mean_batch:>10.1f} {offline:>13.1f} {rate / offline:>14.2f}")
                if args.peer:
                    peer, peer_p50, _, bad = wrk_load(peer_port, bodies, clients, args.seconds,
                                                      data)
                    if bad:
                        raise RuntimeError(f"{bad} answers of the peer were not 200")
                    row += f" {peer:>10.1f} {peer_p50:>8.1f} {rate / peer:>11.2f}"
                print(row)
        finally:
            server.terminate()
            server.wait(30)
            for peer in servers[1:]:  # LitServe's own processes too (its worker ignores TERM)
                os.killpg(peer.pid, signal.SIGKILL)
                peer.wait(30)


if __name__ == "__main__":
    main()
