"""Regenerate cifar10-test-sample.npz: a class-balanced random sample of the CIFAR-10 test split,
kept as the archive's own JPEG files (bytes unchanged), so the tests run on real images in any
clone, with or without the shared data beside it.

    python tests/data/make_cifar10_sample.py ../shared/data/cifar10-jpeg.tar.gz

The file holds `jpeg` (every file's bytes, concatenated, uint8), `offsets` (N + 1 int64: image i
is jpeg[offsets[i]:offsets[i + 1]]), `labels` (int64), `classes` (names, label order) and
`names` (each image's path in the archive). Same archive and arguments: same file contents.
"""

import argparse
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "cifar10-test-sample.npz"


def read_test_split(archive: Path) -> dict[str, dict[str, bytes]]:
    """class -> {archive path: JPEG bytes} of the archive's test/<class>/*.jpg."""
    files: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive) as tar:  # one sequential pass (seeking in a .gz is quadratic)
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 3 and parts[0] == "test":
                files.setdefault(parts[1], {})[m.name] = tar.extractfile(m).read()
    return files


def sample(archive: Path, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """`per_class` images of each class, drawn without replacement by a seeded generator."""
    files = read_test_split(archive)
    rng = np.random.default_rng(seed)
    classes = sorted(files)
    blobs, labels, names = [], [], []
    for y, cls in enumerate(classes):
        paths = sorted(files[cls])
        for i in sorted(rng.choice(len(paths), per_class, replace=False)):
            names.append(paths[i])
            blobs.append(np.frombuffer(files[cls][paths[i]], np.uint8))
            labels.append(y)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return {"jpeg": np.concatenate(blobs), "offsets": offsets,
            "labels": np.asarray(labels, np.int64), "classes": np.asarray(classes),
            "names": np.asarray(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path, help="cifar10-jpeg.tar.gz (test/<class>/*.jpg)")
    parser.add_argument("--per-class", type=int, default=210)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    arrays = sample(args.archive, args.per_class, args.seed)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    args.out.write_bytes(buf.getvalue())
    digest = hashlib.sha256(args.archive.read_bytes()).hexdigest()
    print(f"{len(arrays['labels'])} images, {len(buf.getvalue()) / 1e6:.2f} MB -> {args.out}\n"
          f"source sha256 {digest}")


if __name__ == "__main__":
    main()
