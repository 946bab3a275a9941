"""Replays of the hostile requests that probing found (items 1, 5, 6 and 4 of the hostile-inputs
issue) against a real uvicorn on loopback, on the bundled default model and a fresh data
directory: per replay the status, the wall time and the server's peak resident size (VmHWM of
/proc/PID/status, reset before each replay through /proc/PID/clear_refs), and for the decoding
replay how long /healthz waited. `--worker` replays a pool child SIGKILLed mid-job under CPU
load (real redis-server, api and prefork worker): seconds until the job ran again, and that it
completed once.

    python bench/bench_hostile.py             # api replays (about a minute)
    python bench/bench_hostile.py --worker    # the worker replay (a few minutes)
"""

import argparse
import base64
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from byorl.service.serving.model_upload import user_card  # noqa: E402
from tests import hostile_models  # noqa: E402
from tests.e2e.test_service_e2e import Stack  # noqa: E402
from tests.live import (  # noqa: E402
    free_port,
    healthz_during,
    kill_group,
    start_process,
    tiny_huge_webp,
    uvicorn_argv,
    wait_for,
    wait_ready,
)


def peak_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak(pid: int) -> None:
    """Linux resets VmHWM to the current resident size on "5" (silently skipped elsewhere)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def replay(name: str, pid: int, send) -> dict:
    reset_peak(pid)
    start = time.monotonic()
    r = send()
    row = {"replay": name, "status": r.status_code, "seconds": round(time.monotonic() - start, 2),
           "peak_rss_mib": round(peak_mib(pid)), "code": r.json().get("error", {}).get("code")
           if r.status_code >= 400 else None}
    print(json.dumps(row), flush=True)
    return row


def upload(url: str, data: bytes, name: str) -> httpx.Response:
    return httpx.post(url + "/models", timeout=300, data={"card": json.dumps(
        {"name": name, "input_size": 8})}, files={"file": ("m.onnx", data, "x/onnx")})


def plant(data_dir: Path, onnx: bytes, name: str) -> None:
    """A stored model as the former upload stored it (it passed a batch-of-2 trial)."""
    card = user_card({"name": name, "input_size": 8}, hashlib.sha256(onnx).hexdigest(), 192)
    folder = data_dir / "models" / card["model_id"]
    folder.mkdir(parents=True)
    (folder / "encoder.onnx").write_bytes(onnx)
    (folder / "card.json").write_text(json.dumps(card))


def api_replays(tmp: Path) -> None:
    env = {**os.environ, "BYORL_MODEL_DIR": str(ROOT / "models" / "default"),
           "BYORL_DATA_DIR": str(tmp / "data"), "BYORL_REDIS_URL": "", "BYORL_API_KEY": "",
           "BYORL_THREADS": "1"}
    (tmp / "w.bin").write_bytes(np.ones(hostile_models.DIM, np.float32).tobytes())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_process(uvicorn_argv(port), env, tmp / "api.log", tmp)  # cwd: holds w.bin
    try:
        wait_ready(url)
        pid = proc.pid
        print(json.dumps({"server_pid": pid, "idle_peak_rss_mib": round(peak_mib(pid))}))
        # 1 (and 8): models the former trial passed
        replay("1: Reshape [2,-1] upload", pid,
               lambda: upload(url, hostile_models.batch_of_two_only(), "twoonly"))
        replay("1: external data (w.bin in the api's folder)", pid,
               lambda: upload(url, hostile_models.external_data("w.bin"), "ext"))
        replay("8: ConstantOfShape 256 MiB upload", pid,
               lambda: upload(url, hostile_models.big_constant(256 * 2**20), "big"))
        # 5: tiny bodies of huge images
        image = tiny_huge_webp()
        print(json.dumps({"body_bytes_60_webps": len(json.dumps({"images": [image] * 60}))}))
        for n in (60, 3):
            reset_peak(pid)
            r, took, blocked = healthz_during(url, lambda n=n: httpx.post(
                url + "/embed", json={"images": [image] * n}, timeout=300))
            print(json.dumps({"replay": f"5: /embed {n} x 4096^2 lossless WebP",
                              "status": r.status_code, "seconds": round(took, 2),
                              "healthz_longest_wait_s": round(blocked, 3),
                              "peak_rss_mib": round(peak_mib(pid))}), flush=True)
        # 6: 25 MB of invalid list elements
        body = b'{"index": "g", "embeddings": [' + b",".join([b"{}"] * 8_300_000) + b"]}"
        print(json.dumps({"body_bytes_search": len(body)}))
        replay("6: /search 25 MB of {}", pid, lambda: httpx.post(
            url + "/search", content=body, timeout=300,
            headers={"content-type": "application/json"}))
    finally:
        kill_group(proc, signal.SIGTERM)
    # 1: a real restart on a data directory that holds a model the former upload stored
    plant(tmp / "data", hostile_models.batch_of_two_only(), "twoonly")
    start = time.monotonic()
    proc = start_process(uvicorn_argv(port), env, tmp / "api2.log", tmp)
    try:
        wait_ready(url)
        models = httpx.get(url + "/models").json()
        print(json.dumps({"replay": "1: restart with the stored Reshape model",
                          "ready_after_s": round(time.monotonic() - start, 1),
                          "models": [(m["model_id"], m["available"]) for m in models]}))
    finally:
        kill_group(proc, signal.SIGTERM)


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def random_pngs(n: int) -> list[str]:
    """n seeded 32x32 noise images, base64 PNG (a head's job needs pixels, not meaning)."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)).save(
            buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def worker_replay(tmp: Path, load: int) -> None:
    stack = Stack(tmp, ROOT / "models" / "default")
    burners = []
    try:
        stack.start_redis()
        worker = stack.start("worker", [sys.executable, "-m", "celery", "-A",
                                        "byorl.service.worker", "worker", "--pool", "prefork",
                                        "--concurrency", "1", "--loglevel", "INFO",
                                        "--without-gossip", "--without-mingle"])
        stack.start_api()
        api = httpx.Client(base_url=stack.url, timeout=60)
        images = random_pngs(8)
        burners = [multiprocessing.Process(target=burn, args=(600,)) for _ in range(load)]
        for b in burners:
            b.start()
        job_id = api.post("/linear-head", json={
            "classes": ["a", "b"], "labels": [0] * 4 + [1] * 4, "images": images,
            "robust": True, "epochs": 10, "attack_steps": 1, "min_steps": 10,
            "validation_fraction": 0}).json()["job_id"]
        wait_for(lambda: api.get(f"/jobs/{job_id}").json()["progress"] > 0, 600, "progress")
        child = int(Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()[0])
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: (j := api.get(f"/jobs/{job_id}").json())["attempts"] == 2
                 and j["progress"] > 0, 600, "the job running again")
        again = time.monotonic() - killed
        job = wait_for(lambda: (j := api.get(f"/jobs/{job_id}").json())["state"] in (
            "succeeded", "failed") and j, 600, "the job to finish")
        heads = [h["id"] for h in api.get("/heads").json()["items"]]
        print(json.dumps({"replay": f"4: pool child SIGKILLed mid-job, {load} CPU burners",
                          "running_again_after_s": round(again, 1),
                          "finished_after_s": round(time.monotonic() - killed, 1),
                          "state": job["state"], "attempts": job["attempts"],
                          "heads_stored": heads.count(job_id), "pool_children_now": len(
                              Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
                              .read_text().split()),
                          "children_killed_for_no_up_message": stack.log("worker").count(
                              "Timed out waiting for UP message")}))
    finally:
        for b in burners:
            b.terminate()
        stack.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help="the worker replay (item 4)")
    parser.add_argument("--load", type=int, default=2, help="CPU burner processes (item 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        if args.worker:
            worker_replay(Path(tmp), args.load)
        else:
            api_replays(Path(tmp))


if __name__ == "__main__":
    main()
