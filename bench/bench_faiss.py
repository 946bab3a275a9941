"""The embedding index against its baselines, measured side by side in one run.

1. Exact search: EmbeddingIndex ("Flat", FAISS inner product) against numpy brute force (matrix
   product + argpartition) over 100k x D unit vectors: same top-k, time per query and ratio.
2. Approximate types over 1M vectors: build time, recall@10 against the flat index (the exact
   answer) and query speed-up over it, at two search settings each.

    python bench/bench_faiss.py                                 # 100k x 256, then 1M x 64
    python bench/bench_faiss.py --n 200000 --dim 128 --factories "IVF1024,Flat" HNSW32

The vectors are synthetic: 1000 overlapping Gaussian clusters (like the embeddings of images
of many classes) spread along a 16-dimensional subspace (--latent; embeddings have a low intrinsic
dimension); queries are fresh draws from the same clusters, not indexed items. Isotropic
clusters (--latent = --dim) are much harder for approximate search. Thread counts follow
OMP_NUM_THREADS for FAISS and numpy's BLAS alike.
"""

import argparse
import gc
import time

import faiss
import numpy as np

from byorl.index.faiss_index import EmbeddingIndex

SETTINGS = {"IVF": ("nprobe", (16, 64)), "HNSW": ("ef_search", (32, 128))}


def clustered(n: int, dim: int, latent: int, rng: np.random.Generator,
              clusters: int = 1000) -> np.ndarray:
    """Gaussian clusters spread along a `latent`-dimensional subspace (embeddings have a low
    intrinsic dimension) plus a little isotropic noise; latent = dim: isotropic clusters."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    basis = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):  # in chunks: no float64 copy of the whole set
        m = min(100_000, n - i)
        spread = rng.standard_normal((m, latent), dtype=np.float32) @ basis
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        out[i : i + m] = centres[rng.integers(clusters, size=m)] + 1.5 * spread + 0.05 * noise
    return out


def data(n: int, queries: int, dim: int, latent: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Indexed vectors and fresh queries drawn from the same clusters."""
    x = clustered(n + queries, dim, min(latent, dim), rng)
    return x[:n], x[n:]


def numpy_topk(x: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100) -> np.ndarray:
    """Exact top-k rows of x by inner product (x, queries unit-norm), chunked over queries."""
    out = []
    for i in range(0, len(queries), chunk):
        s = queries[i : i + chunk] @ x.T
        idx = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, idx, 1), axis=1)
        out.append(np.take_along_axis(idx, order, 1))
    return np.concatenate(out)


def timed(fn, *args, repeats: int = 3, **kw):
    """(result, best seconds of `repeats` calls)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args, **kw)
        best = min(best, time.perf_counter() - start)
    return result, best


def build(x: np.ndarray, factory: str) -> tuple[EmbeddingIndex, float]:
    index = EmbeddingIndex(x.shape[1], "bench", factory)
    start = time.perf_counter()
    index.add([str(i) for i in range(len(x))], x)
    return index, time.perf_counter() - start


def ids(hits) -> np.ndarray:
    return np.array([[int(h.key) for h in row] for row in hits])


def exact(args, rng) -> None:
    x, q = data(args.n_exact, args.queries, args.dim_exact, args.latent, rng)
    index, _ = build(x, "Flat")
    unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
    unit_q = q / np.linalg.norm(q, axis=1, keepdims=True)
    ref, t_np = timed(numpy_topk, unit_x, unit_q, args.k)
    got, t_fa = timed(index.search, q, args.k)
    same = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ref, ids(got), strict=True)])
    print(f"\n1. exact top-{args.k}, {args.n_exact:,} x {args.dim_exact}, {args.queries} queries")
    print(f"   numpy brute force      {1e3 * t_np / args.queries:8.3f} ms/query")
    print(f"   EmbeddingIndex Flat    {1e3 * t_fa / args.queries:8.3f} ms/query   "
          f"{t_np / t_fa:.1f}x faster than numpy, same top-{args.k}: {same:.4f}")


def approximate(args, rng) -> None:
    x, q = data(args.n, args.queries, args.dim, args.latent, rng)
    flat, t_build = build(x, "Flat")
    truth, t_flat = timed(flat.search, q, args.k, repeats=1)
    truth = ids(truth)
    del flat
    gc.collect()
    print(f"\n2. approximate, {args.n:,} x {args.dim}, {args.queries} queries, recall@{args.k} "
          f"against Flat ({1e3 * t_flat / args.queries:.3f} ms/query, built in {t_build:.1f} s)")
    print(f"   {'factory':<16} {'build s':>8} {'setting':>14} {'ms/query':>9} "
          f"{'recall@' + str(args.k):>10} {'speed-up':>9}")
    for factory in args.factories:
        index, t_build = build(x, factory)
        name, values = next(v for k, v in SETTINGS.items() if factory.startswith(k))
        for value in values:
            got, t = timed(index.search, q, args.k, repeats=1, **{name: value})
            recall = np.mean([len(set(a) & set(b)) / args.k
                              for a, b in zip(truth, ids(got), strict=True)])
            print(f"   {factory:<16} {t_build:>8.1f} {name + '=' + str(value):>14} "
                  f"{1e3 * t / args.queries:>9.3f} {recall:>10.3f} {t_flat / t:>8.1f}x")
        del index
        gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-exact", type=int, default=100_000)
    p.add_argument("--dim-exact", type=int, default=256)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--latent", type=int, default=16, help="intrinsic dimension of the data")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--factories", nargs="+",
                   default=["IVF1024,Flat", "IVF1024,PQ16", "HNSW32"])
    p.add_argument("--skip-exact", action="store_true")
    args = p.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    rng = np.random.default_rng(0)
    if not args.skip_exact:
        exact(args, rng)
    approximate(args, rng)


if __name__ == "__main__":
    main()
