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

from byorl.model_dir import ONNX
from byorl.service.jobs.head_rule import head_rule
from byorl.service.serving.served_models import find_model_dir
from byorl.service.settings import Settings
from byorl.service.storage.database import open_database
from byorl.service.storage.gallery_backends import read_gallery
from byorl.service.storage.head_store import HeadStore
from byorl.service.storage.job_store import JobStore, LeaseLost
from byorl.service.storage.leases import Heartbeat, runner_identity
from byorl.service.storage.report_store import ReportStore

log = logging.getLogger(__name__)
DETAILED_QUERIES = 16  # queries of a retrieval audit whose neighbours and images the report keeps


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


def _torch_device(device: str) -> str:
    """The GPU when asked or ("auto") when there is one: CUDA is first touched in the job
    process."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked, but PyTorch sees no GPU")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


@functools.cache
def _torch_encoder(model_dir: str, device: str):
    """The model directory's PyTorch weights (encoder.pt), once per process."""
    from byorl.training.checkpoint import load_torch_encoder

    return load_torch_encoder(model_dir).to(_torch_device(device)).eval()


@functools.cache
def _converted(model_dir: str, device: str):
    """The ONNX graph converted to PyTorch (onnx2torch), or the reason it could not be."""
    from byorl.training.onnx_encoder import convert

    try:
        return convert(str(Path(model_dir) / ONNX)).to(_torch_device(device)), None
    except Exception as exc:  # onnx2torch raises many types for ops it lacks
        return None, f"onnx2torch could not convert the graph: {type(exc).__name__}: {exc}"


@functools.cache
def _query_only(model_dir: str, threads: int):
    from byorl.training.onnx_encoder import OnnxRuntimeEncoder

    return OnnxRuntimeEncoder(str(Path(model_dir) / ONNX), threads)


def audit_encoder(model_dir: Path, method: str, settings: Settings, probe: np.ndarray):
    """(encoder, access): the model as a PyTorch module for white-box attacks (its weights, or
    its ONNX graph converted after a parity check against ONNX Runtime on `probe`, uint8
    images), or, when asked or when no conversion is trustworthy, ONNX Runtime itself
    (query-only, black-box). `access` says which, and why, for the report."""
    import torch

    from byorl.training.onnx_encoder import PARITY_TOLERANCE, parity_error

    weights = Path(model_dir) / "encoder.pt"
    if method != "black-box" and weights.is_file():
        return (_torch_encoder(str(model_dir), settings.device),
                {"method": "white-box", "gradients": "the model's PyTorch weights (encoder.pt)"})
    runtime = _query_only(str(model_dir), settings.num_threads)
    reason = "black-box asked"
    if method != "black-box":
        converted, reason = _converted(str(model_dir), settings.device)
        if converted is not None:
            x = torch.cat([torch.from_numpy(probe[:16]).float() / 255,
                           torch.rand(4, *probe.shape[1:], generator=torch.Generator()
                                      .manual_seed(0))])
            device = next(converted.parameters(), torch.empty(0)).device
            error = parity_error(converted, lambda b: runtime(b).to(device), x.to(device))
            parity = {"max_relative_error": error, "tolerance": PARITY_TOLERANCE,
                      "images": len(x), "against": "ONNX Runtime"}
            if error <= PARITY_TOLERANCE:
                return converted, {"method": "white-box", "gradients": "onnx2torch conversion "
                                   "of the ONNX graph", "parity": parity}
            reason = (f"the onnx2torch conversion disagrees with ONNX Runtime: relative error "
                      f"{error:.3g} > {PARITY_TOLERANCE:g}")
        if method == "white-box":
            raise RuntimeError(f"a white-box audit was asked, but {reason}")
    return runtime, {"method": "black-box", "attack": "square (torchattacks), queries through "
                     "ONNX Runtime", "reason": reason, "upper_bound": True,
                     "note": "a black-box attack alone is weaker than a white-box one: the "
                     "robustness it measures is an upper bound"}


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
        params, inputs = job["params"], jobs.inputs(job_id)
        model_dir = find_model_dir(settings, params["model_id"])
        method = params.get("method", "auto") if job["kind"] == "audit" else "auto"
        encoder, access = audit_encoder(model_dir, method, settings, inputs["images"])
        run = {"linear_head": fit_head, "audit": run_audit}[job["kind"]]
        result = run(settings, job_id, params, inputs, (encoder, access),
                     progress)
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


def fit_head(settings: Settings, job_id: str, params: dict, inputs: dict, model, progress) -> dict:
    """Fit a linear head (robust or not) on the submitted labeled set; save it as a head."""
    import torch

    from byorl.training.data import ImageSet
    from byorl.training.linear_classifier import HeadConfig, fit_head

    encoder, access = model
    if params["robust"] and access["method"] != "white-box":
        raise RuntimeError(f"a robust head needs the encoder's gradients, but {access['reason']}")

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
    heads = HeadStore(open_database(settings.database()))
    heads.save(job_id, head.weight.detach().cpu().numpy(), head.bias.detach().cpu().numpy(), card)
    return {"head_id": job_id, "metrics": metrics}


def upper_bound_reasons(params: dict, white_box: bool) -> list[str]:
    """Why an audit's robustness is only an upper bound (none: the paper's full suite,
    white-box, with its sanity checks): what a reader of the number must know."""
    reasons = []
    if not white_box:
        reasons.append("black-box: Square's queries only, no gradients")
    if params["audit"] == "retrieval":
        reasons.append("retrieval: one attack on each query, not an attack suite")
    elif params["mode"] != "full":
        reasons.append(f"mode {params['mode']!r}: a smoke run of the suite (fewer restarts, "
                       "steps and queries than the paper's full suite)")
    return reasons


def run_audit(settings: Settings, job_id: str, params: dict, inputs: dict, model, progress) -> dict:
    """The robust accuracy of encoder + head, or the retrieval audit of an index; the report is
    saved under the job's id, with how the model was attacked (`access`)."""
    import torch

    from byorl.training.attacks import ThreatModel

    encoder, access = model
    white_box = access["method"] == "white-box"
    torch.manual_seed(0)  # the attacks' random starts: the same inputs give the same report
    threat = ThreatModel(params["threat"]["norm"], params["threat"]["eps"])
    images = torch.from_numpy(inputs["images"])
    device = next(encoder.parameters(), torch.empty(0)).device
    if params["audit"] == "robustness":
        from byorl.training.evaluate import evaluate_black_box, evaluate_robustness
        from byorl.training.linear_classifier import Classifier, linear_from

        weights = HeadStore(open_database(settings.database())).weights(params["head_id"])
        head = linear_from(*weights).to(device)
        classifier = Classifier(encoder, head).eval()
        labels = torch.from_numpy(inputs["labels"])
        evaluate = evaluate_robustness if white_box else evaluate_black_box
        report = evaluate(classifier, images, labels, threat, params["mode"], progress=progress)
        report["head_id"] = params["head_id"]
    else:
        from byorl.training.retrieval import retrieval_audit

        keys, vectors, metadata = read_gallery(settings, params["index"])
        if not keys:
            raise ValueError(f"index {params['index']!r} is empty")
        gallery = torch.from_numpy(vectors)
        budget = params["steps"] if white_box else params.get("queries", 1000)
        report = retrieval_audit(encoder, images.to(device).float() / 255, gallery.to(device),
                                 threat, params["k"], budget, progress=progress,
                                 attack="apgd" if white_box else "square",
                                 details=DETAILED_QUERIES)
        for row in report["examples"]:
            for kind in ("neighbours_clean", "neighbours_adversarial"):
                row[kind] = [{"key": keys[j], "score": score,
                              "metadata": metadata[j]} for j, score in row[kind]]
        report.update(index=params["index"], gallery_size=len(gallery))
    reasons = upper_bound_reasons(params, white_box)
    report.update(audit=params["audit"], model_id=params["model_id"], audit_id=job_id,
                  access=access, upper_bound=bool(reasons), upper_bound_reasons=reasons)
    ReportStore(open_database(settings.database())).save(job_id, report)
    return {"audit_id": job_id, "summary": {k: v for k, v in report.items()
                                            if isinstance(v, int | float | str | bool)}}
