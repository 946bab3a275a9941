"""BYORL: adversarially robust self-supervised image embeddings, served over HTTP.

The package's folders are its subpackages: `byorl.training` (PyTorch: training, evaluation,
export), `byorl.index` (FAISS indexes) and `byorl.service` (the FastAPI app and Celery worker).
The names below are the few a Python user starts from; each is imported on first use, so
`import byorl` loads neither PyTorch nor ONNX Runtime (the API process never loads PyTorch).
"""

from importlib import import_module

# name -> the module that defines it
_ENTRY_POINTS = {
    # an exported model directory (encoder.onnx + card.json): open it and embed images
    "read_card": "byorl.model_dir",
    "load_onnx_session": "byorl.model_dir",
    "embed": "byorl.model_dir",
    # train from a config
    "TrainConfig": "byorl.training.config",
    "train": "byorl.training.train",
    # evaluate a checkpoint or run under the attack suite
    "evaluate_checkpoint": "byorl.training.evaluate",
    # talk to a running service
    "Client": "byorl.client",
    "AsyncClient": "byorl.client",
}

__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str):
    """Imports an entry point's module on first use (PEP 562), keeping `import byorl` light."""
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'byorl' has no attribute {name!r}")
    value = getattr(import_module(_ENTRY_POINTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The entry points beside the module's own names (for completion)."""
    return sorted(set(globals()) | set(__all__))
