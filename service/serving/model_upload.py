"""A user's ONNX encoder, validated before it is stored and served (POST /models).

Each check is a clear 4xx: the file's size (MAX_MODEL_BYTES, checked while it streams), the
declared input side (MAX_MODEL_INPUT_SIZE), the graph (ONNX Runtime must open it: one float
input of shape (N, 3, S, S) with a free batch axis), a trial run on a batch of 2 at the declared
size (one finite vector per image, at most MAX_MODEL_DIM long). The stored directory has the
bundled layout (encoder.onnx + a valid card.json with the file's sha256), written in a
dot-folder and renamed into place: a crash never leaves half a model.
"""

import os
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort

from byorl import model_dir
from byorl.files import atomic_write, fsync_dir, sha256_file, write_json
from byorl.service.exceptions import Conflict, Invalid, TooLarge
from byorl.service.serving.encoder import Encoder, load_encoder
from byorl.service.serving.served_models import ModelRegistry, user_models_root
from byorl.service.settings import Settings

TRIAL_BATCH = 2
def invalid(code: str, message: str) -> Invalid:
    return Invalid(code, message)


def open_session(data: bytes) -> ort.InferenceSession:
    """ONNX Runtime's session of the uploaded bytes, on the CPU with one thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several types for a bad graph
        raise invalid("invalid_onnx", f"ONNX Runtime cannot load the file: "
                      f"{str(exc)[:300]}") from None


def check_signature(session: ort.InferenceSession, size: int) -> None:
    """One float input (N, 3, S, S) with a free batch axis, and at least one output."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise invalid("invalid_signature", f"the encoder takes {len(inputs)} inputs; it must "
                      "take exactly one (float32 NCHW pixels in [0, 1])")
    (x,) = inputs
    if x.type != "tensor(float)" or len(x.shape) != 4:
        raise invalid("invalid_signature", f"input {x.name!r} is {x.type} of shape {x.shape}; "
                      "expected tensor(float) of shape (N, 3, S, S)")
    batch, *rest = x.shape
    if isinstance(batch, int):
        raise invalid("invalid_signature", f"input {x.name!r} has a fixed batch size {batch}; "
                      "export it with a dynamic batch axis")
    for got, want, what in zip(rest, (3, size, size), ("channels", "height", "width"),
                               strict=True):
        if isinstance(got, int) and got != want:
            raise invalid("invalid_signature", f"input {x.name!r} has {got} {what}; the card "
                          f"declares (3, {size}, {size})")


def trial_run(session: ort.InferenceSession, size: int, max_dim: int) -> int:
    """The embedding size of a run on a seeded random batch of 2 at the declared size."""
    x = np.random.default_rng(0).random((TRIAL_BATCH, 3, size, size), dtype=np.float32)
    try:
        out = model_dir.embed(session, x)
    except Exception as exc:
        raise invalid("onnx_run_failed", f"the encoder failed on a batch of {TRIAL_BATCH} "
                      f"images of 3x{size}x{size}: {str(exc)[:300]}") from None
    if out.ndim != 2 or out.shape[0] != TRIAL_BATCH:
        raise invalid("invalid_output", f"the encoder returned shape {list(out.shape)} for "
                      f"{TRIAL_BATCH} images; expected one vector per image, ({TRIAL_BATCH}, D)")
    if not 1 <= out.shape[1] <= max_dim:
        raise invalid("invalid_output", f"the encoder returns vectors of {out.shape[1]} "
                      f"numbers; the limit is MAX_MODEL_DIM = {max_dim}")
    if not np.isfinite(out).all():
        raise invalid("invalid_output", "the encoder returned NaN or infinity")
    return int(out.shape[1])


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
    """Validate an uploaded encoder, store it under the data directory and load it (not yet
    serving: `ModelRegistry.add` does that on the event loop)."""
    size = upload["input_size"]
    if size > settings.max_model_input_size:
        raise TooLarge("input_too_large", f"input_size {size} exceeds "
                       f"MAX_MODEL_INPUT_SIZE ({settings.max_model_input_size})")
    session = open_session(data)
    check_signature(session, size)
    dim = trial_run(session, size, settings.max_model_dim)
    root = user_models_root(settings)
    tmp = root / f".creating-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    atomic_write(tmp / model_dir.ONNX, [data])
    card = user_card(upload, sha256_file(tmp / model_dir.ONNX), dim)
    final = root / card["model_id"]
    if card["model_id"] in registry or final.exists():
        os.remove(tmp / model_dir.ONNX)
        tmp.rmdir()
        raise Conflict(f"model {card['model_id']!r} (the same name and file) is already "
                       "registered", "model_exists")
    write_json(tmp / model_dir.CARD, card)
    os.rename(tmp, final)
    fsync_dir(root)
    return load_encoder(Path(final), settings, bundled=False)
