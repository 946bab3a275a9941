"""Jobs as plain functions of the data directory: a Celery worker and the embedded executor
run the same `run_job`, which reads a job's inputs and writes its outputs and state there.

A run holds the job's lease (`service.leases`): a second delivery of a job that finished, or
that a live runner holds, does nothing, and a runner whose lease was taken (it was presumed
dead) stops without recording a result, so a job completes once. Jobs are idempotent: a job
queued again after its worker died re-runs from its inputs and overwrites the same outputs
atomically. Only this module's functions import PyTorch, and only when they run: the api
imports it torch-free.
"""

import functools
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from index.model_card import read_card
from service.gallery import load_index
from service.head_rule import head_rule
from service.leases import Heartbeat, runner_identity
from service.settings import Settings
from service.store import HeadStore, JobStore, LeaseLost, ReportStore

log = logging.getLogger(__name__)


def job_device(asked: str) -> str:
    """The device jobs run on ("cuda" or "cpu") under BYORL_DEVICE=`asked`, asked of PyTorch in
    a subprocess: the worker's parent process, which forks the job processes, must not touch
    CUDA. A worker asked for CUDA that has none fails here, at start, not at its first job."""
    if asked == "cpu":
        return "cpu"
    code = "import torch; print(torch.cuda.is_available(), torch.version.cuda)"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300)
    if probe.returncode != 0:
        raise RuntimeError(f"could not import PyTorch to find the device: {probe.stderr[-500:]}")
    available, cuda_build = probe.stdout.split()
    if available == "True":
        return "cuda"
    if asked == "cuda":
        raise RuntimeError(f"BYORL_DEVICE=cuda, but PyTorch (CUDA build: {cuda_build}) sees no "
                           "GPU: give the container a GPU, or set BYORL_DEVICE=cpu or auto")
    return "cpu"


def init_process(threads: int) -> None:
    """Per job process, before any job: PyTorch's thread count, set explicitly."""
    import torch

    torch.set_num_threads(threads)


@functools.cache
def _encoder(model_dir: str, device: str):
    """The model directory's PyTorch encoder, once per process, on the GPU when asked or
    ("auto") when there is one: CUDA is first touched here, in the job process."""
    import torch

    from training.export import load_torch_encoder

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked, but PyTorch sees no GPU")
    on = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    return load_torch_encoder(model_dir).to(on).eval(), read_card(model_dir)["model_id"]


def run_job(job_id: str, settings: Settings) -> dict | None:
    """Run a job to completion, recording state, progress and result in its record; None when
    it is not this runner's to run (finished, held by a live runner, or taken from it)."""
    jobs, runner = JobStore.from_settings(settings), runner_identity()
    job = jobs.claim(job_id, runner)
    if job is None:  # a duplicate delivery
        return jobs.get(job_id)["result"]
    heartbeat = Heartbeat(lambda: jobs.update(job_id, runner), settings.job_heartbeat_s,
                          LeaseLost)
    heartbeat.start()
    try:
        return _run(jobs, job, runner, settings, heartbeat)
    except LeaseLost:
        log.warning("job %s was queued again while this process ran it: stopped", job_id)
        return None
    finally:
        heartbeat.stop()


def _run(jobs: JobStore, job: dict, runner: dict, settings: Settings, heartbeat: Heartbeat
         ) -> dict:
    job_id, last = job["id"], 0.0

    def progress(done: int, total: int, what: str = "") -> None:
        nonlocal last
        if heartbeat.lost:
            raise LeaseLost(job_id)
        if time.monotonic() - last > 0.2 or done == total:  # bound the record's rewrites
            last = time.monotonic()
            jobs.update(job_id, runner, progress=round(done / max(total, 1), 4),
                        stage=what or job["kind"])

    try:
        encoder, model_id = _encoder(str(settings.model_dir), settings.device)
        if model_id != job["params"]["model_id"]:
            raise RuntimeError(f"job was submitted for model {job['params']['model_id']!r}, "
                               f"this worker serves {model_id!r}")
        run = {"linear_head": fit_head, "audit": run_audit}[job["kind"]]
        result = run(Path(settings.data_dir), job_id, job["params"], jobs.inputs(job_id),
                     encoder, progress)
    except LeaseLost:
        raise
    except Exception as exc:
        jobs.update(job_id, runner, state="failed", stage="failed", finished_at=time.time(),
                    error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    jobs.update(job_id, runner, state="succeeded", stage="done", progress=1.0, result=result,
                finished_at=time.time())
    return result


def _split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, validation) indices: a seeded random hold-out for early stopping."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    return (perm, None) if n_val == 0 else (perm[n_val:], perm[:n_val])


def fit_head(data_dir: Path, job_id: str, params: dict, inputs: dict, encoder, progress) -> dict:
    """Fit a linear head (robust or not) on the submitted labeled set; save it as a head."""
    import torch

    from training.data import ImageSet
    from training.heads import HeadConfig, fit_head

    classes = params["classes"]
    images, labels = torch.from_numpy(inputs["images"]), torch.from_numpy(inputs["labels"])
    data = ImageSet(images, labels, classes)
    fraction, kind, l2 = head_rule(len(data), params["robust"], params.get("validation_fraction"),
                                   params.get("l2"))
    train_idx, val_idx = _split(len(data), fraction)
    val = None if val_idx is None else data.subset(torch.from_numpy(val_idx))
    config = HeadConfig(norm=params["threat"]["norm"], eps=params["threat"]["eps"],
                        attack_steps=params["attack_steps"], epochs=params["epochs"],
                        min_steps=params["min_steps"], decay_epoch=params["epochs"] // 2, l2=l2)
    head, history = fit_head(kind, encoder, data.subset(torch.from_numpy(train_idx)), val,
                             len(classes), config, progress)
    metrics = {
        "head_kind": kind,
        "l2": history.get("l2", l2),
        "train_accuracy": history["train_acc"][-1],
        "best_val_accuracy": history["best_val_acc"],
        "val_metric": history["val_metric"],
        "best_epoch": history["best_epoch"],
        "optimizer_steps": history["optimizer_steps"],
        "num_train": len(train_idx),
        "num_val": 0 if val_idx is None else len(val_idx),
    }
    card = {"id": job_id, "model_id": params["model_id"], "classes": classes,
            "robust": params["robust"], "threat": params["threat"], "metrics": metrics,
            "created_at": time.time()}
    HeadStore(data_dir).save(job_id, head.weight.detach().cpu().numpy(),
                             head.bias.detach().cpu().numpy(), card)
    return {"head_id": job_id, "metrics": metrics}


def run_audit(data_dir: Path, job_id: str, params: dict, inputs: dict, encoder, progress) -> dict:
    """The robust accuracy of encoder + head, or the retrieval audit of an index; the report is
    saved under the job's id."""
    import torch

    from training.attacks import ThreatModel

    threat = ThreatModel(params["threat"]["norm"], params["threat"]["eps"])
    images = torch.from_numpy(inputs["images"])
    device = next(encoder.parameters()).device
    if params["audit"] == "robustness":
        from training.evaluate import evaluate_robustness
        from training.heads import Classifier, linear_from

        head = linear_from(*HeadStore(data_dir).weights(params["head_id"])).to(device)
        model = Classifier(encoder, head).eval()
        labels = torch.from_numpy(inputs["labels"])
        report = evaluate_robustness(model, images, labels, threat, params["mode"],
                                     progress=progress)
        report["head_id"] = params["head_id"]
    else:
        from training.retrieval import retrieval_audit

        index = load_index(data_dir, params["index"])
        if not len(index):
            raise ValueError(f"index {params['index']!r} is empty")
        gallery = torch.from_numpy(np.stack([index.get(k).vector for k in index.keys()]))
        report = retrieval_audit(encoder, images.to(device).float() / 255, gallery.to(device),
                                 threat, params["k"], params["steps"], progress=progress)
        report.update(index=params["index"], gallery_size=len(gallery))
    report.update(audit=params["audit"], model_id=params["model_id"], audit_id=job_id)
    ReportStore(data_dir).save(job_id, report)
    return {"audit_id": job_id, "summary": {k: v for k, v in report.items()
                                            if isinstance(v, int | float | str | bool)}}
