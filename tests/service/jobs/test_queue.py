"""Job queues: the Celery configuration, and embedded mode end to end in a fresh api process
that must never import PyTorch (its jobs run in spawned child processes)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import torch
from fastapi.testclient import TestClient

from byorl.service.jobs.queue import make_celery
from byorl.service.main import create_app
from byorl.service.settings import Settings
from byorl.service.storage.database import open_database
from byorl.service.storage.head_store import HeadStore
from byorl.service.storage.job_store import JobStore
from byorl.training.checkpoint import load_torch_encoder
from byorl.training.linear_classifier import Classifier
from tests.live import wait_for

# Runs in a fresh interpreter: the api (in-process client, embedded jobs) on BYORL_* settings.
API_SCRIPT = r"""
import json, sys, time
from fastapi.testclient import TestClient
from byorl.service.main import create_app

images, labels, classes = json.load(sys.stdin)
keys = [f"k{i}" for i in range(len(images))]

def wait(c, job_id):
    while (job := c.get(f"/jobs/{job_id}").json())["state"] in ("queued", "running"):
        time.sleep(0.2)
    return job

out = {}
with TestClient(create_app()) as c:  # submit, then stop the api before the job can finish
    c.post("/indexes", json={"name": "g"})
    c.post("/indexes/g/items", json={"keys": keys, "images": images})
    head = c.post("/linear-head", json={"classes": classes, "labels": labels, "index": "g",
                                        "keys": keys, "epochs": 3, "min_steps": 30})
    out["head_job"] = head.json()
with TestClient(create_app()) as c:  # a restarted api runs the unfinished job again
    job_id = out["head_job"]["job_id"]
    out["head"] = wait(c, job_id)
    out["predict"] = c.post(f"/heads/{job_id}/predict", json={"images": images[:6]}).json()
    robust = c.post("/audits", json={"kind": "robustness", "head_id": job_id, "mode": "quick",
                                     "images": images[:4], "labels": labels[:4]}).json()
    retrieval = c.post("/audits", json={"kind": "retrieval", "index": "g", "k": 3, "steps": 2,
                                        "images": images[:2]}).json()
    out["audits"] = [wait(c, a["job_id"]) for a in (robust, retrieval)]
    out["reports"] = [c.get(f"/audits/{a['job_id']}").json() for a in (robust, retrieval)]
out["torch_imported"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_celery_config_loses_no_job_and_recycles_workers():
    s = Settings(redis_url="redis://localhost:6379/0", job_time_limit_s=600,
                 worker_max_tasks_per_child=7)
    conf = make_celery(s).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 7
    assert conf.broker_url == conf.result_backend == s.redis_url
    assert conf.task_soft_time_limit == 600 < conf.task_time_limit
    for options in (conf.broker_transport_options, conf.result_backend_transport_options):
        assert options["visibility_timeout"] > conf.task_time_limit  # never re-sent while alive


def test_embedded_jobs_survive_an_api_restart_and_torch_stays_out(model_dir, tmp_path, labeled):
    images, labels, classes = labeled
    images, labels, classes = images[:12] + images[12:24], [0] * 12 + [1] * 12, classes[:2]
    env = {**os.environ, "BYORL_MODEL_DIR": str(model_dir), "BYORL_DATA_DIR": str(tmp_path),
           "BYORL_THREADS": "1", "BYORL_REDIS_URL": ""}
    proc = subprocess.run([sys.executable, "-c", API_SCRIPT], input=json.dumps(
        [images, labels, classes]), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])

    assert out["torch_imported"] is False
    assert out["head_job"]["state"] == "queued"
    head = out["head"]
    assert head["state"] == "succeeded", head["error"]
    assert head["attempts"] >= 1 and head["result"]["head_id"] == head["id"]

    # The api's numpy predictions are the PyTorch classifier's (encoder + saved head).
    weight, bias = HeadStore(open_database(Settings(data_dir=tmp_path).database())).weights(
        head["id"])
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    linear.load_state_dict({"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)})
    pixels = np.load(tmp_path / "jobs" / head["id"] / "input.npz")["images"][:6]
    with torch.no_grad():
        ref = torch.softmax(Classifier(load_torch_encoder(model_dir), linear)(
            torch.from_numpy(pixels) / 255.0), 1).numpy()
    np.testing.assert_allclose(out["predict"]["probabilities"], ref, atol=1e-4)
    assert out["predict"]["classes"] == [classes[y] for y in ref.argmax(1)]

    assert [a["state"] for a in out["audits"]] == ["succeeded", "succeeded"]
    robust, retrieval = out["reports"]
    assert robust["n"] == 4 and 0 <= robust["robust_accuracy"] <= robust["clean_accuracy"]
    assert retrieval["num_queries"] == 2 and retrieval["gallery_size"] == 24


def test_an_embedded_job_whose_process_was_killed_runs_again_once(model_dir, tmp_path, labeled):
    """SIGKILL of the job's process (out of memory, say): the job runs again, in a new process,
    and completes once."""
    images, labels, classes = labeled
    few = [0, 1, 2, 3, 12, 13, 14, 15]  # 4 of each of two classes
    jobs = JobStore.from_settings(Settings(data_dir=tmp_path))
    with TestClient(create_app(Settings(model_dir=model_dir, data_dir=tmp_path,
                                        threads=1))) as client:
        r = client.post("/linear-head", json={
            "classes": classes[:2], "labels": [labels[i] for i in few],
            "images": [images[i] for i in few], "robust": True, "epochs": 10,
            "attack_steps": 1, "min_steps": 10, "validation_fraction": 0})
        job_id = r.json()["job_id"]
        wait_for(lambda: jobs.get(job_id)["progress"] > 0, 120, "the job to make progress")
        os.kill(jobs.get(job_id)["runner"]["pid"], signal.SIGKILL)
        job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}").json())["state"] in (
            "succeeded", "failed") and j, 180, "the job to finish")
        assert job["state"] == "succeeded" and job["attempts"] == 2, job["error"]
        assert client.get(f"/heads/{job_id}").status_code == 200
