"""Recall and latency of Milvus gallery indexes on real embeddings: CIFAR-10 images embedded by
the bundled encoder (models/default), a gallery of train images, queries from the test split;
recall@k against exact cosine neighbours, for HNSW and IVF_FLAT at several search parameters.
The segments are flushed and indexed first (Milvus searches growing segments by brute force).

    BYORL_MILVUS_URI=http://127.0.0.1:19530 python bench/bench_milvus.py --n 10000 --queries 200
"""

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from byorl.service.settings import Settings
from byorl.service.storage.milvus_galleries import MilvusGalleries

ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"


def read_images(archive: Path, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 3, 32, 32) of the first train and test images in the archive."""
    out = {"train": [], "test": []}
    want = {"train": n_train, "test": n_test}
    with tarfile.open(archive) as tar:
        for member in tar:
            split = member.name.split("/")[0]
            if member.isfile() and split in out and len(out[split]) < want[split]:
                data = tar.extractfile(member).read()
                out[split].append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                                  .transpose(2, 0, 1))
            if all(len(out[s]) >= want[s] for s in out):
                break
    return np.stack(out["train"]), np.stack(out["test"])


def embed(pixels: np.ndarray, model: Path) -> np.ndarray:
    session = ort.InferenceSession(str(model / "encoder.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: pixels[i:i + 256].astype(np.float32) / 255})[0]
           for i in range(0, len(pixels), 256)]
    x = np.concatenate(out)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def wait_indexed(g: MilvusGalleries, collection: str, n: int) -> None:
    g.client.flush(collection)
    while True:
        info = g.client.describe_index(collection, "vector")
        if int(info.get("indexed_rows", 0)) >= n:
            break
        time.sleep(1)
    g.client.release_collection(collection)
    g.client.load_collection(collection)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    args = parser.parse_args()
    train, test = read_images(args.archive, args.n, args.queries)
    t = time.perf_counter()
    gallery, queries = embed(train, args.model), embed(test, args.model)
    print(f"embedded {len(gallery)} + {len(queries)} images in {time.perf_counter() - t:.1f} s")
    exact = np.argsort(-(queries @ gallery.T), axis=1)[:, :args.k]
    keys = [f"t{i}" for i in range(len(gallery))]
    settings = Settings(data_dir=Path(tempfile.mkdtemp()), milvus_uri=os.environ.get(
        "BYORL_MILVUS_URI", "http://127.0.0.1:19530"), milvus_prefix="bench_")
    g = MilvusGalleries(settings)
    configs = {"HNSW16": ("ef", [16, 32, 64, 128]), "HNSW32": ("ef", [16, 32, 64, 128]),
               "IVF128,Flat": ("nprobe", [4, 8, 16, 32])}
    for factory, (param, values) in configs.items():
        name = "bench-" + factory.replace(",", "-")
        if name in g.names():
            g.delete(name)
        g.create(name, gallery.shape[1], "m", factory)
        t = time.perf_counter()
        for i in range(0, len(keys), 1000):
            g.add(name, keys[i:i + 1000], gallery[i:i + 1000], train[i:i + 1000], None, "m")
        added = time.perf_counter() - t
        wait_indexed(g, g.get(name).collection, len(keys))
        print(f"{factory}: added {len(keys)} in {added:.1f} s, indexed")
        for value in values:
            option = {"ef_search" if param == "ef" else "nprobe": value}
            g.search(name, queries[:10], args.k, **option)  # warm
            t = time.perf_counter()
            found = [g.search(name, queries[i:i + 1], args.k, **option)[0]
                     for i in range(len(queries))]
            ms = 1000 * (time.perf_counter() - t) / len(queries)
            recall = np.mean([len({int(h.key[1:]) for h in row} & set(e.tolist())) / args.k
                              for row, e in zip(found, exact, strict=True)])
            print(f"  {param}={value}: recall@{args.k} {recall:.3f}, {ms:.1f} ms per query "
                  "(bounded)")
        g.delete(name)
    g.close()


if __name__ == "__main__":
    main()
