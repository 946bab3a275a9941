"""Cost of metadata filters on a Flat gallery: building the field index (the first filtered
search), its memory, and filtered searches at several selectivities beside an unfiltered one.

    python bench/bench_filters.py --n 100000 --dim 256
"""

import argparse
import time
import tracemalloc

import numpy as np

from byorl.index.faiss_index import EmbeddingIndex, _FieldIndex


def timed(fn, repeat: int) -> float:
    """Median milliseconds of fn()."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    meta = [{"source": ("web", "scan", "phone")[i % 3], "label": i % 10, "n": i,
             "url": f"https://example.org/images/{i:08d}.jpg"} for i in range(args.n)]
    index = EmbeddingIndex(args.dim, "m", "Flat", use_gpu=False)
    index.add([f"k{i}" for i in range(args.n)], x, meta)
    q = rng.standard_normal((args.queries, args.dim)).astype(np.float32)

    t = time.perf_counter()
    index.search(q[:1], 10, filter={"source": "web"})  # the first filtered search builds it
    build_s = time.perf_counter() - t
    fields = index._fields
    tracemalloc.start()  # a second build, traced (tracemalloc slows it down: not timed)
    again = _FieldIndex()
    for i, text in index._meta.items():
        again.add(i, text)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del again
    print(f"{args.n} items, 4 fields each (3 shared values, 10, and 2 unique): field index "
          f"built by the first filtered search in {build_s:.2f} s, {size / 2**20:.1f} MiB "
          f"({size / args.n:.0f} B per item)")

    print(f"unfiltered, {args.queries} queries, k=10: "
          f"{timed(lambda: index.search(q, 10), args.repeat):.1f} ms")
    cases = {
        "source=web (1/3 match: FAISS + ID selector)": {"source": "web"},
        "label in [1,2] (1/5: FAISS + ID selector)": {"label": {"in": [1, 2]}},
        "source=web, label=1 (1/30: exact)": {"source": "web", "label": 1},
        "n in 100 values (exact)": {"n": {"in": list(range(0, 10_000, 100))}},
        "url = one (exact)": {"url": "https://example.org/images/00000042.jpg"},
    }
    for name, spec in cases.items():
        matched = len(fields.matching({f: {v} if not isinstance(v, dict) else set(v["in"])
                                       for f, v in spec.items()}))
        ids_ms = timed(lambda s=spec: fields.matching(
            {f: {v} if not isinstance(v, dict) else set(v["in"]) for f, v in s.items()}),
            args.repeat)
        ms = timed(lambda s=spec: index.search(q, 10, filter=s), args.repeat)
        print(f"{name}: {matched} match; ids {ids_ms:.1f} ms; search {ms:.1f} ms")


if __name__ == "__main__":
    main()
