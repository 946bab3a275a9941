"""An exported model directory: its validated card and an ONNX Runtime session.

A model directory (`byorl export`) holds `encoder.onnx` (input `images`, float32 NCHW pixels in
[0, 1], dynamic batch; output `embeddings` (N, D)), `card.json` and `encoder.pt` (weights for
workers that need gradients, loaded by `byorl.training.checkpoint.load_torch_encoder`). Nothing
here imports PyTorch: the API process never does.
"""

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from byorl.files import sha256_file

CARD = "card.json"
ONNX = "encoder.onnx"
WEIGHTS = "encoder.pt"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
CARD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model_id": str,
    "architecture": str,
    "width": int,
    "embedding_dim": int,
    "input_size": list,
    "threat_model": dict,
    "training": dict,
    "onnx_sha256": str,
    "metrics": dict,
    "command": str,
}


class ModelCardError(ValueError):
    """A model directory whose card is missing or invalid, or whose ONNX file is not the one
    the card describes."""


def knn_problems(knn: Any) -> list[str]:
    """What is wrong with a card's optional metrics.knn (`byorl knn --card`): accuracies k1
    and k20 in [0, 1] and the rule that produced them. Cards without one stay valid."""
    if knn is None:
        return []
    if not isinstance(knn, dict):
        return [f"metrics.knn should be a dict, got {type(knn).__name__}"]
    problems = [f"metrics.knn.{k} should be a number in [0, 1], got {knn.get(k)!r}"
                for k in ("k1", "k20")
                if not isinstance(knn.get(k), int | float) or not 0 <= knn[k] <= 1]
    if not isinstance(knn.get("rule"), str):
        problems.append("metrics.knn.rule should name the k-NN rule")
    return problems


def validate_card(card: Any, where: str = "card") -> dict:
    """The card itself when it has every field with the right type, else ModelCardError."""
    if not isinstance(card, dict):
        raise ModelCardError(f"{where}: a model card is a JSON object")
    problems = [f"missing {k!r}" for k in CARD_FIELDS if k not in card]
    problems += [
        f"{k!r} should be {t.__name__}, got {type(card[k]).__name__}"
        for k, t in CARD_FIELDS.items() if k in card and not isinstance(card[k], t)
    ]
    if not problems:
        size, threat = card["input_size"], card["threat_model"]
        if len(size) != 3 or size[0] != 3 or not all(isinstance(s, int) and s > 0 for s in size):
            problems.append(f"input_size should be [3, H, W], got {size}")
        if card["embedding_dim"] < 1:
            problems.append(f"embedding_dim should be >= 1, got {card['embedding_dim']}")
        if threat.get("norm") not in ("linf", "l2", None):
            problems.append(f"threat_model.norm should be linf, l2 or null, not {threat['norm']!r}")
        if not isinstance(threat.get("eps"), int | float) or threat["eps"] < 0:
            problems.append(f"threat_model.eps should be a number >= 0, got {threat.get('eps')!r}")
        problems += knn_problems(card["metrics"].get("knn"))
    if problems:
        raise ModelCardError(f"{where}: " + "; ".join(problems))
    return card


def read_card(model_dir: str | Path) -> dict:
    """The validated card.json of a model directory."""
    path = Path(model_dir) / CARD
    if not path.is_file():
        raise ModelCardError(f"{model_dir} has no {CARD}: export a model with `byorl export`")
    try:
        card = json.loads(path.read_text())
    except ValueError as e:
        raise ModelCardError(f"{path}: not valid JSON ({e})") from None
    return validate_card(card, str(path))


def restrict_untrusted(options: ort.SessionOptions) -> ort.SessionOptions:
    """Options for a graph from elsewhere (a user's upload): no memory arena, so that what a
    run allocates goes back when the run ends instead of staying in the arena for good."""
    options.enable_cpu_mem_arena = False
    return options


def load_onnx_session(model_dir: str | Path, threads: int | None = None,
                      device: str = "auto", spin: bool = True,
                      untrusted: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session of the directory's encoder, after checking its sha256.

    device "auto" takes the CUDA execution provider when onnxruntime-gpu offers it (ONNX Runtime
    falls back to the CPU, with a warning, when no GPU is usable), "cpu" forces the CPU.
    `threads` (default: the cores this process may use) is set explicitly because ONNX Runtime's
    own default oversubscribes cores shared with PyTorch or a second session. `spin` (ONNX
    Runtime's default) keeps its threads busy-waiting between runs: lower latency for a lone
    caller, but cores taken from anything else the process does. `untrusted`: a user's graph
    (`restrict_untrusted`).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    card = read_card(model_dir)
    path = Path(model_dir) / ONNX
    if not path.is_file():
        raise ModelCardError(f"{model_dir} has no {ONNX}")
    if sha256_file(path) != card["onnx_sha256"]:
        raise ModelCardError(f"{path} does not match the sha256 in its card: re-export the model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if untrusted:
        restrict_untrusted(options)
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif device == "cuda":
        raise ModelCardError("device cuda asked, but onnxruntime has no CUDA provider "
                             "(install onnxruntime-gpu)")
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and session_device(session) != "cuda":  # ONNX Runtime fell back
        raise ModelCardError("device cuda asked, but ONNX Runtime could not use a GPU "
                             f"(session providers: {session.get_providers()})")
    return session


def session_device(session: ort.InferenceSession) -> str:
    """Where a session runs its first-choice nodes: "cuda" or "cpu" (what /readyz reports)."""
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def embed(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256,
          progress: bool = False) -> np.ndarray:
    """(N, D) float32 embeddings of (N, 3, H, W) images: uint8, or float pixels in [0, 1]."""
    (source,), output = session.get_inputs(), session.get_outputs()[0]  # any names (user models)
    dim = output.shape[1] if isinstance(output.shape[1], int) else 0  # 0: a symbolic size
    out = [np.empty((0, dim), np.float32)]
    with tqdm(total=len(images), desc="embed", unit="img", disable=not progress) as bar:
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            x = batch / np.float32(255) if batch.dtype == np.uint8 else batch
            out.append(session.run([output.name], {source.name: x.astype(np.float32)})[0])
            bar.update(len(batch))
    return np.concatenate(out[1:]) if len(out) > 1 else out[0]
