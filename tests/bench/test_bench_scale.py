"""bench/bench_scale.py's measuring parts, on small random data (the bench itself needs the
CIFAR-10 archive, a Milvus server and minutes)."""

import numpy as np

from bench.bench_scale import bench_embedded_storage, exact_top, recall


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_top_is_the_k_best_in_order_and_recall_counts_overlap():
    gallery, queries = unit(500), unit(7, seed=1)
    top = exact_top(queries, gallery)
    assert (top == np.argsort(-(queries @ gallery.T), axis=1)[:, :10]).all()
    assert recall([row.tolist() for row in top], top) == 1.0
    half = [row[:5].tolist() + [-1] * 5 for row in top]
    assert recall(half, top) == 0.5


def test_embedded_store_is_built_reopened_and_searched():
    vectors, queries = unit(300), unit(5, seed=1)
    pixels = np.zeros((300, 3, 4, 4), np.uint8)
    out = bench_embedded_storage("Flat", vectors, pixels, queries, exact_top(queries, vectors))
    assert out["recall"] == 1.0 and len(out["search_ms"]) == 5
    assert out["build_s"] > 0 and out["open_s"] > 0
