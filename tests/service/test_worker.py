"""The worker's start: it says which device its jobs run on, and a worker asked for CUDA on a
machine without a GPU refuses to start (no silent CPU fallback)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from byorl.service.jobs import tasks

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
