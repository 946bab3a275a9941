"""Image sets decoded once to uint8 tensors and cached; label subsets for the low-label regime.

A *source* is "cifar10" or "cifar100" (torchvision, downloaded under `root` when asked), an
ImageFolder directory, or a `.tar.gz` of one. A directory or archive that holds `train/` and
`test/` folders is split by them; otherwise all its images form the split asked for.
"""

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from byorl.files import atomic_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
DECODING = "upright-rgb"  # in the cache key: caches of an older decode_image are not reused
DEFAULT_CACHE = Path(os.environ.get("BYORL_CACHE") or Path.home() / ".cache" / "byorl")
VAL_SIZE = 1024


@dataclass
class ImageSet:
    """uint8 images (N, 3, H, W), int64 labels (N,), and class names (label i is classes[i])."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], self.classes)

    def random_subset(self, size: int, seed: int = 0) -> "ImageSet":
        """`size` items drawn with a seed (all of them when size is 0 or too large): image
        folders are sorted by class, so the first `size` would not do."""
        if not 0 < size < len(self):
            return self
        return self.subset(
            torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size]
        )


def decode_image(data: bytes, size: int | None) -> np.ndarray:
    """Bytes of any Pillow format -> (3, H, W) uint8, resized to size x size when size is set:
    upright (EXIF orientation) and RGB, as the service decodes a request's images, so that an
    index built here and a query embedded there see the same pixels."""
    with Image.open(io.BytesIO(data)) as im:
        ImageOps.exif_transpose(im, in_place=True)
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im).transpose(2, 0, 1).copy()


def _split_and_class(parts: tuple[str, ...], split: str, has_splits: bool) -> str | None:
    """Class name of an image path, or None when it is not in the requested split."""
    if has_splits:
        if split not in parts[:-2]:
            return None
        parts = parts[parts.index(split) + 1 :]
    return parts[-2] if len(parts) >= 2 else ""  # an image at the top level has no class


def _read_entries(source: Path, split: str) -> list[tuple[str, bytes]]:
    """(class name, file bytes) of every image of `split` in a folder or a .tar(.gz) archive."""
    if source.is_dir():  # files are read only when they belong to the split
        files = [(p.relative_to(source).parts, p) for p in source.rglob("*")
                 if p.suffix.lower() in IMAGE_EXTENSIONS]
    else:
        with tarfile.open(source) as tar:  # one sequential pass: seeking in a .gz is quadratic
            files = [(Path(m.name).parts, tar.extractfile(m).read()) for m in tar
                     if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS)]
    files.sort(key=lambda f: f[0])
    has_splits = any(("train" in p[:-2] or "test" in p[:-2]) for p, _ in files)
    out = []
    for parts, data in files:
        cls = _split_and_class(parts, split, has_splits)
        if cls is not None:
            out.append((cls, data if isinstance(data, bytes) else data.read_bytes()))
    return out


def _load_folder(source: Path, split: str, size: int | None) -> ImageSet:
    entries = _read_entries(source, split)
    if not entries:
        raise ValueError(f"no images for split {split!r} in {source}")
    classes = sorted({c for c, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    arrays = [decode_image(b, size) for _, b in tqdm(entries, desc=f"decode {source.name}/{split}")]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"images in {source} have different sizes {sorted(shapes)[:3]}; pass a size"
        )
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([index[c] for c, _ in entries], dtype=torch.int64)
    return ImageSet(images, labels, classes)


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> ImageSet:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    ds = cls(str(root), train=split == "train", download=download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def _cache_key(source: str, split: str, size: int | None) -> str:
    path = Path(source)
    stamp = ""
    if path.exists():
        st = path.stat()
        stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    key = f"{source}|{stamp}|{split}|{size}|{DECODING}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_images(
    source: str,
    split: str = "train",
    size: int | None = 32,
    root: str | Path = "data",
    download: bool = False,
    cache_dir: str | Path | None = DEFAULT_CACHE,
) -> ImageSet:
    """Load a split of a source as uint8 tensors, decoding at most once per cache directory."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache = None
    if cache_dir is not None:
        cache = (
            Path(cache_dir) / f"{Path(source).name}-{split}-{_cache_key(source, split, size)}.pt"
        )
        if cache.exists():
            d = torch.load(cache, weights_only=True)
            return ImageSet(d["images"], d["labels"], list(d["classes"]))
    if source.lower() in ("cifar10", "cifar100"):
        data = _load_torchvision(source.lower(), split, Path(root), download)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"image source {source!r} is neither cifar10/cifar100 nor a path"
            )
        data = _load_folder(path, split, size)
    if cache is not None:
        with atomic_file(cache) as f:
            torch.save({"images": data.images, "labels": data.labels, "classes": data.classes}, f)
    return data


def load_unlabeled(sources: list[str], size: int = 32, **kw) -> torch.Tensor:
    """The training images of extra unlabeled sources (a flat folder counts whole as training)."""
    chunks = [load_images(s, "train", size, **kw).images for s in sources]
    return torch.cat(chunks) if chunks else torch.empty(0, 3, size, size, dtype=torch.uint8)


def label_subset(
    num_train: int, amount: float, seed: int = 0, val_size: int = VAL_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (labeled, validation) into the training set: a seeded random, not class-balanced,
    subset. `amount` <= 1 is a fraction of the images left after the validation split; > 1 a count.
    """
    if amount <= 0:
        raise ValueError(f"label amount must be > 0, got {amount}")
    if val_size >= num_train:
        raise ValueError(f"validation size {val_size} leaves no training images of {num_train}")
    perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    val, rest = perm[:val_size], perm[val_size:]
    count = round(amount * len(rest)) if amount <= 1 else int(amount)
    if count > len(rest):
        raise ValueError(f"asked for {count} labels but only {len(rest)} training images remain")
    return rest[: max(count, 1)], val
