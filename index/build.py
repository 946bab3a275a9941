"""Build an embedding index of an image array with an exported encoder (no PyTorch)."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from byorl.index.faiss_index import EmbeddingIndex
from byorl.model_dir import embed, load_onnx_session, read_card


def build_index(model_dir: str | Path, images: np.ndarray, keys: Sequence[str],
                metadata: Sequence[Any] | None = None, factory: str = "Flat",
                batch_size: int = 256, threads: int | None = None,
                progress: bool = False) -> EmbeddingIndex:
    """Embed uint8 (N, 3, H, W) images at the model's input size and index them under keys."""
    card = read_card(model_dir)
    if tuple(images.shape[1:]) != tuple(card["input_size"]):
        raise ValueError(f"images of shape {tuple(images.shape[1:])}, but model "
                         f"{card['model_id']} takes {tuple(card['input_size'])}")
    vectors = embed(load_onnx_session(model_dir, threads), images, batch_size, progress)
    index = EmbeddingIndex(card["embedding_dim"], card["model_id"], factory)
    index.add(keys, vectors, metadata, model_id=card["model_id"])
    return index
