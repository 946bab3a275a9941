"""Gallery writes and opening at 10k, 100k and 1M items (256-d vectors, 3x32x32 pixel records),
the SQLite storage (service/gallery_store.py) side by side with the whole-rewrite storage it
replaced, measured in the same run.

For each size: one-item add and one-item removal latency (p50/p99/max over --adds writes, every
one durable when it returns), search latency (one query, k=10) with the gallery idle and while
another thread adds, and opening time (a restarted api), for both storages. The old storage is
the write path of service/gallery.py at commit a583aee, reduced to what it did per write:
append the pixels (fsync), rewrite the key -> record JSON map, rewrite the whole index file.

    python bench/bench_gallery.py                       # 10k, 100k, 1M
    python bench/bench_gallery.py --sizes 10000 --adds 100

Writes are timed after the bulk load was written back to disk (`os.sync`), as in a gallery
that grew over time; opening right after it, so the files are in the page cache (a warm
restart). The data goes to a temporary directory (--dir), ~10 GB at 1M, removed after.
"""

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from byorl.files import atomic_write
from byorl.index.faiss_index import EmbeddingIndex
from byorl.service.storage.galleries import Galleries

DIM, PIXELS, CHUNK = 256, (3, 32, 32), 10_000


class OldGallery:
    """The whole-rewrite storage (service/gallery.py at a583aee): index.bin, pixels-0.u8 and
    pixels.json, all rewritten or appended per write."""

    def __init__(self, root: Path, index: EmbeddingIndex, rows: dict[str, int]):
        self.root, self.index, self.rows = root, index, rows

    @classmethod
    def build(cls, root: Path, keys: list[str], vectors: np.ndarray, pixels) -> "OldGallery":
        root.mkdir(parents=True)
        index = EmbeddingIndex(DIM, "bench")
        index.add(keys, vectors)
        with open(root / "pixels-0.u8", "wb") as f:
            for chunk in pixels:
                f.write(chunk.tobytes())
        old = cls(root, index, {k: i for i, k in enumerate(keys)})
        old._save()
        return old

    @classmethod
    def open(cls, root: Path) -> "OldGallery":
        index = EmbeddingIndex.load(root / "index.bin")
        return cls(root, index, json.loads((root / "pixels.json").read_text())["rows"])

    def add(self, keys: list[str], vectors: np.ndarray, pixels: np.ndarray) -> None:
        path = self.root / "pixels-0.u8"
        start = path.stat().st_size // pixels[0].nbytes
        with open(path, "ab") as f:
            f.write(pixels.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.rows.update({k: start + i for i, k in enumerate(keys)})
        atomic_write(self.root / "pixels.json", [self._map()])
        self.index.add(keys, vectors)
        self.index.save(self.root / "index.bin")

    def remove(self, keys: list[str]) -> None:
        self.index.remove(keys)
        self.index.save(self.root / "index.bin")
        for k in keys:
            self.rows.pop(k)
        atomic_write(self.root / "pixels.json", [self._map()])

    def _map(self) -> bytes:
        state = {"file": "pixels-0.u8", "shape": list(PIXELS), "rows": self.rows}
        return json.dumps(state).encode()

    def _save(self) -> None:
        atomic_write(self.root / "pixels.json", [self._map()])
        self.index.save(self.root / "index.bin")


def pixel_chunks(n: int, rng):
    """n pixel records in chunks (one random chunk reused: the storage does not compress)."""
    chunk = rng.integers(0, 256, (CHUNK, *PIXELS), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        yield chunk[: min(CHUNK, n - start)]


def latencies(fn, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out[i] = time.perf_counter() - start
    return out * 1e3


def summary(ms: np.ndarray) -> str:
    return f"{np.percentile(ms, 50):8.2f} {np.percentile(ms, 99):8.2f} {ms.max():8.1f}"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def search_ms(index: EmbeddingIndex, queries: np.ndarray) -> np.ndarray:
    return latencies(lambda i: index.search(queries[i % len(queries)], 10), 2 * len(queries))


def fsync_floor(path: Path, n: int) -> np.ndarray:
    """What the disk charges for durability: a 4 KiB append and its fsync (an add needs one)."""
    with open(path, "ab") as f:
        def append(i):
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())

        return latencies(append, n)


def bench_new(root: Path, n: int, vectors: np.ndarray, rng, args) -> dict:
    g = Galleries(root)
    g.create("bench", DIM, "bench")
    keys = [f"item-{i}" for i in range(n)]
    _, t_load = timed(lambda: [
        g.add("bench", keys[s : s + CHUNK], vectors[s : s + CHUNK], p, None, "bench")
        for s, p in zip(range(0, n, CHUNK), pixel_chunks(n, rng), strict=True)])
    g.close()
    os.sync()  # the bulk load's gigabytes written back: later fsyncs do not wait for them
    g, t_open = timed(lambda: Galleries(root))
    fresh = rng.standard_normal((args.adds, DIM), dtype=np.float32)
    one_pixel = rng.integers(0, 256, (1, *PIXELS), dtype=np.uint8)
    floor = fsync_floor(root / "fsync-probe", args.adds)
    adds = latencies(lambda i: g.add("bench", [f"new-{i}"], fresh[i : i + 1], one_pixel,
                                     [{"i": i}], "bench"), args.adds)
    removals = latencies(lambda i: g.remove("bench", [f"new-{i}"]), args.adds)
    queries = rng.standard_normal((args.queries, DIM), dtype=np.float32)
    busy = search_while_adding(g, queries, fresh, one_pixel)
    return {"load": t_load, "open": t_open, "adds": adds, "removals": removals,
            "search_busy": busy, "gallery": g, "fsync": floor}


def search_while_adding(g: Galleries, queries, fresh, one_pixel) -> np.ndarray:
    stop, count = threading.Event(), [0]

    def adder():
        while not stop.is_set():
            i = count[0] % len(fresh)
            g.add("bench", [f"busy-{count[0]}"], fresh[i : i + 1], one_pixel, None, "bench")
            count[0] += 1

    thread = threading.Thread(target=adder)
    thread.start()
    try:
        return search_ms(g.get("bench"), queries)
    finally:
        stop.set()
        thread.join()


def bench_old(root: Path, n: int, vectors: np.ndarray, rng, args) -> dict:
    keys = [f"item-{i}" for i in range(n)]
    OldGallery.build(root, keys, vectors, pixel_chunks(n, rng))
    os.sync()
    old, t_open = timed(lambda: OldGallery.open(root))
    writes = args.old_adds if n < 1_000_000 else args.old_adds_1m
    fresh = rng.standard_normal((writes, DIM), dtype=np.float32)
    one_pixel = rng.integers(0, 256, (1, *PIXELS), dtype=np.uint8)
    adds = latencies(lambda i: old.add([f"new-{i}"], fresh[i : i + 1], one_pixel), writes)
    removals = latencies(lambda i: old.remove([f"new-{i}"]), writes)
    return {"open": t_open, "adds": adds, "removals": removals, "index": old.index}


def search_side_by_side(new: dict, old: dict, queries: np.ndarray) -> None:
    """Both indexes answer the same queries, alternately (a drifting load hits both alike)."""
    index = new["gallery"].get("bench")
    ms = latencies(lambda i: (index if i % 2 else old["index"]).search(
        queries[i // 2 % len(queries)], 10), 4 * len(queries))
    new["search"], old["search"] = ms[1::2], ms[0::2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--adds", type=int, default=500, help="timed one-item adds (and removals)")
    p.add_argument("--old-adds", type=int, default=5, help="old storage, below 1M items")
    p.add_argument("--old-adds-1m", type=int, default=2, help="old storage, 1M items")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--dir", default=None, help="where the galleries are written")
    args = p.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {DIM}-d vectors, "
          f"{'x'.join(map(str, PIXELS))} pixel records; latencies in ms (p50 p99 max)")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        vectors = rng.standard_normal((n, DIM), dtype=np.float32)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            new = bench_new(Path(tmp) / "new", n, vectors, rng, args)
            old = bench_old(Path(tmp) / "old", n, vectors, rng, args)
            search_side_by_side(new, old, rng.standard_normal((args.queries, DIM), np.float32))
            new["gallery"].close()
        del vectors, new["gallery"], old["index"]
        print(f"\n{n:,} items (bulk load of the new storage: {new['load']:.1f} s)")
        print(f"  {'':28} {'new (SQLite)':>26}   {'old (whole rewrite)':>26}")
        for what in ("adds", "removals", "search"):
            print(f"  {'one-item ' + what.rstrip('s'):28} {summary(new[what])}   "
                  f"{summary(old[what])}")
        print(f"  {'search while adding':28} {summary(new['search_busy'])}")
        print(f"  {'4 KiB append + fsync (disk)':28} {summary(new['fsync'])}")
        print(f"  {'open (s)':28} {new['open']:26.2f}   {old['open']:26.2f}")


if __name__ == "__main__":
    main()
