"""k-nearest-neighbour classification accuracy of embeddings: are an encoder's clean
neighbours right? Robust neighbours are only useful if they are.

The rule (RULE, written into every result and card): cosine similarity (inner product of
L2-normalised vectors, exact search with faiss.IndexFlatIP); a query takes the label held by
most of its k nearest gallery items, a tie between labels going to the tied label whose
nearest item ranks first (so k=1 is the nearest item's label). Votes are unweighted, unlike the
InstDisc/lightly kNN monitor (weights exp(cosine / 0.1)): no temperature to choose or report.
"""

import json
from pathlib import Path

import faiss
import numpy as np

from byorl.files import atomic_write
from byorl.model_dir import CARD, embed, load_onnx_session, read_card, validate_card
from byorl.training.data import DEFAULT_CACHE, load_images

KS = (1, 20)
RULE = ("cosine; majority vote of the k nearest training images, a tie going to the tied "
        "class whose nearest member ranks first")


def nearest_labels(queries: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray,
                   k: int, batch_size: int = 1024) -> np.ndarray:
    """Labels (Q, k') of each query's k' = min(k, gallery size) most cosine-similar gallery
    rows, nearest first; queries searched batch_size at a time so the scores held stay
    bounded whatever the number of queries."""
    gallery = np.array(gallery, dtype=np.float32)  # copies: normalize_L2 works in place
    faiss.normalize_L2(gallery)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    k = min(k, len(gallery))
    rows = []
    for i in range(0, len(queries), batch_size):
        q = np.array(queries[i : i + batch_size], dtype=np.float32)
        faiss.normalize_L2(q)
        rows.append(index.search(q, k)[1])
    ids = np.concatenate(rows) if rows else np.empty((0, k), np.int64)
    return np.asarray(gallery_labels)[ids]


def vote(labels: np.ndarray) -> np.ndarray:
    """Per row of non-negative int labels (nearest first), the most frequent one; among tied
    labels, the one that appears first (RULE)."""
    n, k = labels.shape
    rows = np.repeat(np.arange(n), k)
    counts = np.zeros((n, labels.max(initial=0) + 1), np.int64)
    np.add.at(counts, (rows, labels.ravel()), 1)
    first = np.full(counts.shape, k, np.int64)
    np.minimum.at(first, (rows, labels.ravel()), np.tile(np.arange(k), n))
    return np.argmax(counts * (k + 1) - first, axis=1)  # count first, then the earliest rank


def knn_accuracy(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                 gallery_labels: np.ndarray, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """k -> fraction of queries whose RULE prediction from the gallery is their label; one
    search for the largest k, each k voting on its prefix."""
    labels = nearest_labels(queries, gallery, gallery_labels, max(ks))
    return {k: float((vote(labels[:, :k]) == np.asarray(query_labels)).mean()) for k in ks}


def model_knn(model_dir: str | Path, data: str, queries: int = 2000, seed: int = 0,
              threads: int | None = None, cache_dir: str | Path | None = DEFAULT_CACHE) -> dict:
    """k-NN accuracy (KS) of an exported encoder run by ONNX Runtime: `queries` test images
    drawn with `seed` (0: all) against every training image of `data` (a load_images source)."""
    card = read_card(model_dir)
    size = card["input_size"][1]
    gallery = load_images(data, "train", size, cache_dir=cache_dir)
    test = load_images(data, "test", size, cache_dir=cache_dir).random_subset(queries, seed)
    if test.classes != gallery.classes:  # labels index the class lists: they must agree
        raise ValueError(f"{data}: test classes {test.classes} are not the training classes "
                         f"{gallery.classes}")
    session = load_onnx_session(model_dir, threads)
    acc = knn_accuracy(embed(session, test.images.numpy()), test.labels.numpy(),
                       embed(session, gallery.images.numpy()), gallery.labels.numpy())
    return {**{f"k{k}": round(a, 6) for k, a in acc.items()}, "n_queries": len(test),
            "n_gallery": len(gallery), "metric": "cosine", "rule": RULE, "data": data,
            "seed": seed, "model_id": card["model_id"], "onnx_sha256": card["onnx_sha256"]}


def write_to_card(model_dir: str | Path, result: dict) -> dict:
    """Put a model_knn result on the directory's card as metrics.knn and return the card;
    encoder.onnx is untouched, so the card's onnx_sha256 stays valid. Refused for a result
    measured on another ONNX file."""
    card = read_card(model_dir)
    if result.get("onnx_sha256") != card["onnx_sha256"]:
        raise ValueError(f"this k-NN result was measured on {result.get('model_id')}, not on "
                         f"{card['model_id']} in {model_dir}")
    card["metrics"]["knn"] = result
    atomic_write(Path(model_dir) / CARD, [json.dumps(validate_card(card), indent=2).encode()])
    return card
