"""The worker's start: it says which device its jobs run on, a worker asked for CUDA on a
machine without a GPU refuses to start (no silent CPU fallback), and pool children that start
slowly are waited for."""

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from byorl.service.jobs import tasks
from tests.e2e.test_service_e2e import Stack
from tests.live import wait_for

ROOT = Path(__file__).resolve().parents[2]


def start_worker_module(device: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BYORL_DEVICE": device, "BYORL_REDIS_URL": "redis://127.0.0.1:1/0"}
    return subprocess.run([sys.executable, "-c", "import byorl.service.worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_job_device_follows_the_setting_and_the_machine():
    gpu = torch.cuda.is_available()
    assert tasks.job_device("cpu") == "cpu"
    assert tasks.job_device("auto") == ("cuda" if gpu else "cpu")
    if gpu:
        assert tasks.job_device("cuda") == "cuda"
    else:
        with pytest.raises(RuntimeError, match="BYORL_DEVICE=cuda, but PyTorch .* sees no GPU"):
            tasks.job_device("cuda")


def test_a_worker_asked_for_cuda_without_a_gpu_fails_at_start():
    if torch.cuda.is_available():  # the machine has a GPU: the same start succeeds
        assert start_worker_module("cuda").returncode == 0
        return
    failed = start_worker_module("cuda")
    assert failed.returncode == 1
    assert "worker: BYORL_DEVICE=cuda, but PyTorch" in failed.stderr
    assert "Traceback" not in failed.stderr  # one clear line, not a stack
    assert start_worker_module("cpu").returncode == 0


def pool_children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_a_killed_pool_child_is_replaced_though_children_start_slowly(model_dir, tmp_path,
                                                                      image_bytes):
    """Real Redis, api and prefork worker; pool children that take 6 s to start (Celery killed
    any child not up within 4 s: the worker spawned and killed children forever). A child
    SIGKILLed mid-job is replaced, and the job runs again and completes once."""
    stack = Stack(tmp_path, model_dir)
    stack.env.update(PYTHONPATH=str(ROOT), BYORL_TEST_CHILD_START_S="6")
    try:
        stack.start_redis()
        worker = stack.start("worker", [sys.executable, "-m", "celery", "-A",
                                        "tests.service.slow_child_worker", "worker", "--pool",
                                        "prefork", "--concurrency", "1", "--loglevel", "INFO",
                                        "--without-gossip", "--without-mingle"])
        stack.start_api()
        api = httpx.Client(base_url=stack.url, timeout=30)
        few = [b for cls in ("cat", "ship") for b in image_bytes[cls][:4]]
        r = api.post("/linear-head", json={
            "classes": ["cat", "ship"], "labels": [0] * 4 + [1] * 4, "robust": True,
            "images": [base64.b64encode(b).decode() for b in few], "epochs": 10,
            "attack_steps": 1, "min_steps": 10, "validation_fraction": 0})
        job_id = r.json()["job_id"]
        wait_for(lambda: api.get(f"/jobs/{job_id}").json()["progress"] > 0, 300,
                 "the job to make progress")
        (child,) = pool_children(worker.pid)
        os.kill(child, signal.SIGKILL)
        job = wait_for(lambda: (j := api.get(f"/jobs/{job_id}").json())["state"] in (
            "succeeded", "failed") and j, 300, "the job to finish after the kill")
        assert job["state"] == "succeeded" and job["attempts"] == 2, job["error"]
        assert "Timed out waiting for UP message" not in stack.log("worker")
        assert len(pool_children(worker.pid)) == 1
    finally:
        stack.stop_all()
