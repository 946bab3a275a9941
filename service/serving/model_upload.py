"""A user's ONNX encoder, validated before it is stored and served (POST /models).

Each check is a clear 4xx: the file's size (MAX_MODEL_BYTES, checked while it streams), the
declared input side (MAX_MODEL_INPUT_SIZE), then the trial in a child process with memory and
time limits (`model_trial.py`: ONNX Runtime opens it without external data, its signature, runs
at batch sizes 1, 2 and 4). The stored directory has the bundled layout (encoder.onnx + a valid
card.json with the file's sha256), written in a dot-folder and renamed into place inside the
model registry's transaction (`storage/model_store.py`): a crash never leaves half a model, and
of concurrent uploads of the same model, on any replicas, the database's key lets one win; the
others get 409.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from byorl import model_dir
from byorl.files import atomic_write, fsync_dir, sha256_file, write_json
from byorl.service.exceptions import Invalid, TooLarge
from byorl.service.serving.encoder import Encoder, load_encoder
from byorl.service.serving.served_models import (
    ModelRegistry,
    user_model_path,
    user_models_root,
)
from byorl.service.settings import Settings
from byorl.service.storage.model_store import exists

TRIAL = [sys.executable, "-m", "byorl.service.serving.model_trial"]


def trial_in_child(data: bytes, size: int, settings: Settings) -> int:
    """The vector length of the uploaded encoder, from its trial (`model_trial.py`) in a child
    process under MODEL_TRIAL_MEMORY_BYTES and MODEL_TRIAL_TIMEOUT_S, run in an empty folder
    (nothing for a relative path to find); each problem a 422."""
    argv = [*TRIAL, str(size), str(settings.max_model_dim), str(settings.model_trial_memory_bytes)]
    timeout = settings.model_trial_timeout_s
    with tempfile.TemporaryDirectory(prefix="byorl-trial-") as empty:
        try:
            done = subprocess.run(argv, input=data, capture_output=True, timeout=timeout,
                                  cwd=empty)
        except subprocess.TimeoutExpired:
            raise Invalid("trial_timeout", f"the encoder's trial (open and runs at batch sizes "
                          f"1, 2, 4) took more than MODEL_TRIAL_TIMEOUT_S = {timeout} s") from None
    try:
        answer = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = done.stderr.decode(errors="replace").strip()[-300:]
        raise Invalid("trial_failed", f"the encoder's trial process died (exit status "
                      f"{done.returncode}; MODEL_TRIAL_MEMORY_BYTES = "
                      f"{settings.model_trial_memory_bytes}): {tail}") from None
    if "dim" not in answer:
        raise Invalid(answer["code"], answer["message"])
    return answer["dim"]


def user_card(upload: dict, sha256: str, dim: int) -> dict:
    """A model card (byorl.model_dir's card fields) for an uploaded encoder, from the card the
    user sent (`name`, `input_size`, `threat_model` (`norm`, `eps`) or None, `description`,
    validated by the API)."""
    claim = upload.get("threat_model")
    card = {
        "model_id": f"{upload['name']}-{sha256[:8]}",
        "architecture": "onnx",
        "width": 0,
        "embedding_dim": dim,
        "input_size": [3, upload["input_size"], upload["input_size"]],
        "threat_model": {"norm": claim["norm"] if claim else None,
                         "eps": claim["eps"] if claim else 0, "claimed": True},
        "training": {"method": "unknown", "source": "uploaded by a user"},
        "onnx_sha256": sha256,
        "metrics": {},
        "command": "POST /models",
        "name": upload["name"],
        "description": upload.get("description", ""),
        "created_at": time.time(),
    }
    return model_dir.validate_card(card)


def register_model(data: bytes, upload: dict, settings: Settings,
                   registry: ModelRegistry) -> Encoder:
    """Validate an uploaded encoder, load it, then register it in the model registry and move
    its folder into the data directory in one step (`ModelStore.register`): every replica can
    serve it from then on. The encoder is returned not yet serving (`ModelRegistry.add`)."""
    size = upload["input_size"]
    if size > settings.max_model_input_size:
        raise TooLarge("input_too_large", f"input_size {size} exceeds "
                       f"MAX_MODEL_INPUT_SIZE ({settings.max_model_input_size})")
    dim = trial_in_child(data, size, settings)
    root = user_models_root(settings)
    tmp = root / f".creating-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        atomic_write(tmp / model_dir.ONNX, [data])
        card = user_card(upload, sha256_file(tmp / model_dir.ONNX), dim)
        model_id = card["model_id"]
        if registry.store.get(model_id) is not None:  # early: no load for a known model
            raise exists(model_id)
        write_json(tmp / model_dir.CARD, card)
        try:
            model = load_encoder(tmp, settings, bundled=False)
        except Exception as exc:  # what the trial missed is never registered
            raise Invalid("onnx_run_failed",
                          f"the encoder failed to load: {str(exc)[:300]}") from None
        final = root / model_id
        registry.store.register(card, user_model_path(model_id),
                                lambda: move_into_place(tmp, final),
                                max_models=settings.max_user_models)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless it was refused
    fsync_dir(root)
    model.model_dir = final
    return model


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished dot-folder to the model's, while the registry's transaction holds
    the model's row: a folder already there has no registered model (a crash's or an older
    version's leftover) and is replaced."""
    if final.exists():
        final.rename(final.with_name(f".orphan-{final.name}-{uuid.uuid4().hex[:8]}"))
    os.rename(tmp, final)
