"""Atomic checkpoint files and loading a trained encoder back from a run, a checkpoint or an
exported model directory."""

from pathlib import Path

import torch

from byorl.files import atomic_file
from byorl.model_dir import CARD, WEIGHTS, read_card
from byorl.training.models import create_model

CHECKPOINT = "checkpoint.pt"


def save_atomic(obj, path: str | Path) -> None:
    """torch.save through `atomic_file`: a kill at any moment leaves the old file or the new."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    p = checkpoint_path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    return torch.load(p, map_location=map_location, weights_only=False)


def load_torch_encoder(model_dir: str | Path, map_location="cpu") -> torch.nn.Module:
    """An exported model directory's encoder as a PyTorch module in eval mode (for workers and
    tools that need gradients; the API serves the ONNX file instead)."""
    read_card(model_dir)  # a directory without a valid card is not a finished export
    state = torch.load(Path(model_dir) / WEIGHTS, map_location=map_location, weights_only=True)
    encoder = create_model(state["arch"], width=state["width"])
    encoder.load_state_dict(state["state_dict"])
    return encoder.eval()


def load_encoder(path: str | Path, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """The online encoder of a run directory or checkpoint, or of an exported model directory
    (models/default: no checkpoint needed to evaluate or demo it), in eval mode, and the run's
    config."""
    if (Path(path) / CARD).exists():
        return load_torch_encoder(path, map_location), read_card(path)["training"]["config"]
    ckpt = load_checkpoint(path, map_location)
    config = ckpt["config"]
    encoder = create_model(config["model"]["arch"], width=config["model"]["width"])
    prefix = "encoder."
    state = {k[len(prefix) :]: v for k, v in ckpt["online"].items() if k.startswith(prefix)}
    encoder.load_state_dict(state)
    return encoder.eval(), config
