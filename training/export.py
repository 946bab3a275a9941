"""Export a trained encoder to a model directory that the service runs without PyTorch.

`encoder.onnx` (normalisation inside the graph, dynamic batch) is what the API serves,
`encoder.pt` is what workers load for white-box attacks, and `card.json` describes both. The
card is written after the weights, and the export fails unless ONNX Runtime, loading the
directory exactly as the service does, matches PyTorch on random and real images.
"""

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from byorl.files import atomic_write, sha256_file
from byorl.model_dir import (
    CARD,
    INPUT_NAME,
    ONNX,
    OUTPUT_NAME,
    WEIGHTS,
    embed,
    load_onnx_session,
    validate_card,
)
from byorl.training.checkpoint import load_encoder, save_atomic
from byorl.training.data import load_images

PARITY_TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| over embedding coordinates
PARITY_BATCHES = (1, 64)


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch on the exported encoder."""


def onnx_bytes(encoder: nn.Module, input_size: tuple[int, int, int]) -> bytes:
    """The encoder as an ONNX model with a dynamic batch axis.

    Uses the torch.export-based exporter (the default since PyTorch 2.9; the TorchScript one is
    deprecated). Traced at batch 2 so that batch 1 is not specialised as a constant.
    """
    program = torch.onnx.export(
        encoder.eval(),
        (torch.rand(2, *input_size),),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    return program.model_proto.SerializeToString()


def parity_error(encoder: nn.Module, session, images: torch.Tensor) -> float:
    """Max |ONNX Runtime - PyTorch| on float images in [0, 1], run at batch sizes 1 and 64."""
    worst = 0.0
    with torch.no_grad():
        for n in PARITY_BATCHES:
            x = images[:n]
            ref = encoder(x).numpy()
            got = embed(session, x.numpy(), batch_size=n)
            worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def _threat_model(config: dict) -> dict:
    attack = config["attack"]
    if attack["method"] == "none":  # plain BYOL: trained for no threat model
        return {"norm": None, "eps": 0.0, "attack": "none"}
    return {"norm": attack["norm"], "eps": attack["eps"], "attack": attack["method"],
            "steps": attack["steps"]}


def card_metrics(report: dict) -> dict:
    """What a model card keeps of a `byorl evaluate` report: the clean and robust accuracy of
    each head and the setting that produced them. Any other dict is kept whole."""
    if "heads" not in report:
        return report
    return {
        "threat_model": report["threat_model"], "mode": report["mode"], "data": report["data"],
        "labels": report["labels"]["count"], "n_test": report["n_test"],
        "heads": {kind: {k: h["evaluation"][k] for k in ("clean_accuracy", "robust_accuracy")}
                  for kind, h in report["heads"].items()},
    }


def _real_images(source: str, config: dict) -> torch.Tensor:
    """The first test images of a source, as floats in [0, 1], for the parity check."""
    size = config["data"]["image_size"]
    try:
        data = load_images(source, "test", size, root=config["data"]["root"])
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"the parity check needs real images, and {source!r} cannot be "
                         f"loaded ({e}): name an image folder or archive") from e
    return data.images[: max(PARITY_BATCHES)].float() / 255


def export_encoder(checkpoint_or_run: str | Path, out_dir: str | Path,
                   metrics: dict | None = None, images: str | None = None,
                   command: str | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write encoder.onnx, encoder.pt and card.json to out_dir and return the card.

    Parity is checked on random images and on the test split of `images` (a load_images source;
    default: the run's training data). `metrics` (a `byorl evaluate` report or any dict) go
    into the card through `card_metrics`. Raises ParityError, leaving no card (so no loadable
    model), when ONNX Runtime and PyTorch differ. `progress(done, total, stage)` follows the
    five stages.
    """

    def stage(done: int, what: str) -> None:
        if progress is not None:
            progress(done, 5, what)

    encoder, config = load_encoder(checkpoint_or_run)
    stage(1, "checkpoint loaded")
    arch, width = config["model"]["arch"], config["model"]["width"]
    size = config["data"]["image_size"]
    input_size = (3, size, size)
    parity_images = {
        "random": torch.rand(max(PARITY_BATCHES), *input_size,
                             generator=torch.Generator().manual_seed(0)),
        "real": _real_images(images or config["data"]["source"], config),
    }
    stage(2, "parity images loaded")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD).unlink(missing_ok=True)  # the directory is not a model until parity holds

    atomic_write(out / ONNX, [onnx_bytes(encoder, input_size)])
    stage(3, "onnx exported")
    save_atomic({"arch": arch, "width": width, "state_dict": encoder.state_dict()}, out / WEIGHTS)
    sha = sha256_file(out / ONNX)
    threat = _threat_model(config)
    data = [config["data"]["source"], *config["data"].get("extra_unlabeled", [])]
    card = validate_card({
        "model_id": f"{arch}-x{width}-{threat['norm'] or 'clean'}-{sha[:8]}",
        "architecture": arch,
        "width": width,
        "embedding_dim": encoder.num_features,
        "input_size": list(input_size),
        "threat_model": threat,
        "training": {"method": "byol" if threat["norm"] is None else "byorl", "data": data,
                     "config": config},
        "onnx_sha256": sha,
        "metrics": card_metrics(metrics or {}),
        "command": command or shlex.join(sys.argv),
    })
    atomic_write(out / CARD, [json.dumps(card, indent=2).encode()])
    stage(4, "weights and card written")
    session = load_onnx_session(out)
    errors = {name: parity_error(encoder, session, x) for name, x in parity_images.items()}
    if max(errors.values()) >= PARITY_TOLERANCE:
        (out / CARD).unlink()
        raise ParityError(f"ONNX Runtime differs from PyTorch by {errors} (max abs), "
                          f"tolerance {PARITY_TOLERANCE}: {out} is not a usable model")
    card["parity"] = {"max_abs_diff": errors, "tolerance": PARITY_TOLERANCE,
                      "batch_sizes": list(PARITY_BATCHES)}
    atomic_write(out / CARD, [json.dumps(card, indent=2).encode()])
    stage(5, "parity checked")
    return card

